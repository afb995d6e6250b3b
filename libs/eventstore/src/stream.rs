use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::context::AccountErrorKind;
use async_nats::jetstream::{self, stream};

use crate::envelope::Subjects;

/// How long JetStream remembers a `Nats-Msg-Id`. A command retried after a lost
/// ack (client timeout, reconnect) is deduplicated inside this window; two
/// minutes covers our publish timeout and retries many times over while
/// keeping the server's dedupe map small under heavy write load.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// What a stream must look like: a context declares its own with
/// [`StreamSpec::new`]; [`dlq_spec`] is the dead-letter stream.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    pub name: String,
    pub subjects: Vec<String>,
    /// Tokens in an aggregate id: 1 for `orders.<order>`, 2 for
    /// `lines.<order>.<line>`. A subject with another count is
    /// not an aggregate's (a poison event).
    pub id_tokens: usize,
    pub replicas: usize,
    pub description: String,
    /// The byte budget: at this size the stream refuses new events
    /// (`discard: new`) instead of dropping old ones, and commands answer
    /// 507. It bounds what unauthenticated writes can do to the disk.
    pub max_bytes: i64,
}

/// A stream's byte budget unless the service is told otherwise: 10 GiB,
/// ~100k events at the largest payload (1 MiB), millions of ordinary ones.
pub const STREAM_MAX_BYTES_DEFAULT: i64 = 10 * 1024 * 1024 * 1024;
/// The dead-letter stream's budget: parked copies of poison events.
pub const DLQ_MAX_BYTES: i64 = 1024 * 1024 * 1024;

impl StreamSpec {
    /// A context's event stream `name` with subjects `<root>.>`, one subject
    /// per aggregate: `<root>.<id>`, where an id has `id_tokens` tokens.
    #[must_use]
    pub fn new(name: &str, root: &str, id_tokens: usize, description: &str) -> Self {
        Self {
            name: name.to_string(),
            subjects: vec![format!("{root}.>")],
            id_tokens: id_tokens.max(1),
            replicas: 1,
            description: description.to_string(),
            max_bytes: STREAM_MAX_BYTES_DEFAULT,
        }
    }

    /// The same stream with `replicas` replicas (1 locally, 3 on a cluster).
    #[must_use]
    pub fn with_replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// How the stream's subjects name aggregates.
    #[must_use]
    pub fn subjects_layout(&self) -> Subjects {
        Subjects::new(
            self.subjects
                .first()
                .map(|s| s.trim_end_matches('>'))
                .unwrap_or_default(),
            self.id_tokens,
        )
    }

    /// The same stream with a byte budget of `max_bytes`.
    #[must_use]
    pub fn with_max_bytes(mut self, max_bytes: i64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    fn config(&self) -> stream::Config {
        stream::Config {
            name: self.name.clone(),
            description: Some(self.description.clone()),
            subjects: self.subjects.clone(),
            // Events are the source of truth: never discard any, by count or
            // age. The byte budget refuses new events when full (`discard`).
            retention: stream::RetentionPolicy::Limits,
            max_messages: -1,
            max_bytes: self.max_bytes,
            max_age: Duration::ZERO,
            max_messages_per_subject: -1,
            // At the byte budget, Old would silently drop the oldest history;
            // New refuses the write instead, and nothing is lost.
            discard: stream::DiscardPolicy::New,
            discard_new_per_subject: false,
            max_consumers: -1,
            // -1 lets the server's max_payload (1 MiB) bound the event size.
            max_message_size: -1,
            // Acknowledged means stored; the fsync policy is the server's sync_interval.
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            no_ack: false,
            duplicate_window: DUPLICATE_WINDOW,
            template_owner: String::new(),
            sealed: false,
            // History is immutable: no rollups, no deletes, no purges.
            allow_rollup: false,
            deny_delete: true,
            deny_purge: true,
            republish: None,
            // Aggregates are loaded with direct gets, served by any replica.
            allow_direct: true,
            mirror_direct: false,
            mirror: None,
            sources: None,
            metadata: HashMap::new(),
            subject_transform: None,
            // Postcard payloads are already compact; s2 costs CPU on every read.
            compression: Some(stream::Compression::None),
            consumer_limits: None,
            first_sequence: None,
            placement: None,
            // Default persistence: the ack is sent after the write reaches the store.
            persist_mode: Some(stream::PersistenceMode::Default),
            pause_until: None,
            allow_message_ttl: false,
            subject_delete_marker_ttl: None,
            // One event per command (see ARCHITECTURE.md), so no atomic batches.
            allow_atomic_publish: false,
            allow_message_schedules: false,
            allow_message_counter: false,
            allow_batch_publish: false,
        }
    }
}

/// The dead-letter stream where projections republish poison events.
#[must_use]
pub fn dlq_spec(replicas: usize) -> StreamSpec {
    StreamSpec {
        name: "DLQ".to_string(),
        subjects: vec!["dlq.>".to_string()],
        // dlq.<projection>.<STREAM>.<seq>
        id_tokens: 3,
        replicas,
        description: "poison events parked by projections: dlq.<projection>.<STREAM>.<seq>"
            .to_string(),
        max_bytes: DLQ_MAX_BYTES,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error("jetstream is not enabled on this server: {0}")]
    JetStreamDisabled(String),
    #[error("stream {name} exists with a conflicting setting: {detail}")]
    Conflicting { name: String, detail: String },
    #[error("cannot create stream {name}: {source}")]
    Create {
        name: String,
        source: jetstream::context::CreateStreamError,
    },
    #[error("cannot reach jetstream: {0}")]
    Unreachable(String),
}

/// Whether JetStream answers on this connection.
///
/// # Errors
/// [`ProvisionError::JetStreamDisabled`] when the server (or account) runs
/// without JetStream, [`ProvisionError::Unreachable`] when it does not answer.
pub async fn check_jetstream(js: &jetstream::Context) -> Result<(), ProvisionError> {
    match js.query_account().await {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.to_string();
            // No responders on the JetStream API, or the API answering 503,
            // means this server (or account) runs without JetStream.
            let disabled = match e.kind() {
                AccountErrorKind::JetStreamUnavailable => true,
                AccountErrorKind::JetStream(api) => api.code() == 503,
                AccountErrorKind::TimedOut | AccountErrorKind::Other => false,
            };
            if disabled || text.contains("not enabled") {
                return Err(ProvisionError::JetStreamDisabled(text));
            }
            Err(ProvisionError::Unreachable(text))
        }
    }
}

/// Creates the stream, or checks that the existing one keeps the durability
/// promises (file storage, no limits, deny delete and purge).
///
/// # Errors
/// [`ProvisionError`] when JetStream is off, unreachable, or the stream exists
/// with settings that would break the promises.
pub async fn provision(
    js: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<stream::Stream, ProvisionError> {
    check_jetstream(js).await?;
    let wanted = spec.config();
    match js.get_stream(&spec.name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| ProvisionError::Unreachable(e.to_string()))?;
            let have = &info.config;
            let mut problems = Vec::new();
            if have.storage != stream::StorageType::File {
                problems.push("storage is not file");
            }
            if have.max_messages != -1 || !have.max_age.is_zero() {
                problems.push("stream has limits that would discard events");
            }
            if have.max_bytes != -1 && have.discard != stream::DiscardPolicy::New {
                problems.push("a byte limit with discard old would drop events");
            }
            if !have.deny_delete || !have.deny_purge {
                problems.push("delete or purge is allowed");
            }
            if have.subjects != wanted.subjects {
                problems.push("subjects differ");
            }
            if !have.allow_direct {
                problems.push("allow_direct is off");
            }
            if !problems.is_empty() {
                return Err(ProvisionError::Conflicting {
                    name: spec.name.clone(),
                    detail: problems.join(", "),
                });
            }
            // Safe to run with, but not what this deployment asked for: an
            // operator changes these on purpose (`nats stream edit`), never a
            // service on start.
            if have.num_replicas != wanted.num_replicas
                || have.duplicate_window != wanted.duplicate_window
            {
                tracing::warn!(
                    stream = %spec.name,
                    replicas = have.num_replicas,
                    wanted_replicas = wanted.num_replicas,
                    duplicate_window_s = have.duplicate_window.as_secs(),
                    wanted_duplicate_window_s = wanted.duplicate_window.as_secs(),
                    "the stream exists with other replicas or duplicate window than configured; \
                     using it as it is"
                );
            }
            // The byte budget is this service's flag: it is what an operator
            // raises when commands answer 507.
            if have.max_bytes != wanted.max_bytes || have.discard != wanted.discard {
                let mut config = have.clone();
                config.max_bytes = wanted.max_bytes;
                config.discard = wanted.discard;
                js.update_stream(&config).await.map_err(|e| {
                    ProvisionError::Unreachable(format!("update {}: {e}", spec.name))
                })?;
                tracing::info!(stream = %spec.name, max_bytes = wanted.max_bytes, "byte budget set");
                return js
                    .get_stream(&spec.name)
                    .await
                    .map_err(|e| ProvisionError::Unreachable(e.to_string()));
            }
            Ok(existing)
        }
        Err(_) => js
            .create_stream(wanted)
            .await
            .map_err(|source| ProvisionError::Create {
                name: spec.name.clone(),
                source,
            }),
    }
}
