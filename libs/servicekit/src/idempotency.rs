//! `Idempotency-Key` for creates: a JetStream KV bucket of the context maps
//! the key to the aggregate id it created. The key is reserved with a
//! create-only KV write before the event is appended, and the append itself
//! expects an empty subject, so a key creates at most one aggregate even
//! across instances and crashes.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long a key is remembered: a day covers client retry policies.
const KEY_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest accepted `Idempotency-Key`, in bytes.
pub const KEY_BYTES_MAX: usize = 255;
/// The bucket's byte budget: a reservation takes ~250 bytes with its
/// overhead, so about a million keys a day; past it creates with a key
/// answer 507, and creates without one go on.
const BUCKET_MAX_BYTES: i64 = 256 * 1024 * 1024;
/// Namespace of the name-based event ids of keyed creates (UUIDv5).
const EVENT_ID_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x8f1d_2b6c_4e0a_5f3b_9c7d_1a2e_3b4c_5d6e);

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reservation {
    /// The aggregate the key created.
    pub id: String,
    /// SHA-256 of the normalised request body: a key reused with another body is refused.
    pub body_sha256: String,
}

/// The bucket `bucket` (`<STREAM>_IDEMPOTENCY`), created if missing.
///
/// # Errors
/// When JetStream refuses or does not answer.
pub async fn open_bucket(
    js: &jetstream::Context,
    bucket: &str,
    replicas: usize,
) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: bucket.to_string(),
        description: "Idempotency-Key -> the id of the aggregate its create made".to_string(),
        max_value_size: 1024,
        // Only the reservation matters, never its history.
        history: 1,
        max_age: KEY_TTL,
        max_bytes: BUCKET_MAX_BYTES,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas,
        republish: None,
        mirror: None,
        sources: None,
        mirror_direct: false,
        compression: false,
        placement: None,
        limit_markers: None,
    })
    .await
    .map_err(|e| e.to_string())
}

/// The bucket key of a client's `Idempotency-Key`, scoped by route and by
/// caller: two callers that pick the same key never meet. `caller` is the
/// `Actor` the gateway sets from the token's `sub` (empty without one).
#[must_use]
pub fn key_for(route: &str, caller: &str, idempotency_key: &str) -> String {
    let mut h = Sha256::new();
    for part in [route, caller, idempotency_key] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    eventstore::hex(&h.finalize())
}

/// The event id (`Nats-Msg-Id`) of the create a scoped key makes: a
/// name-based UUID, so a second append of it inside the stream's duplicate
/// window is refused by the stream itself, whatever the bucket says.
#[must_use]
pub fn event_id_for(scoped_key: &str) -> String {
    uuid::Uuid::new_v5(&EVENT_ID_NAMESPACE, scoped_key.as_bytes()).to_string()
}

pub enum Reserve {
    /// This request reserved the key for the candidate's id.
    Fresh(String),
    /// An earlier request holds the key.
    Existing(Reservation),
}

pub async fn reserve(
    bucket: &kv::Store,
    key: &str,
    candidate: Reservation,
) -> Result<Reserve, String> {
    if let Some(existing) = get(bucket, key).await? {
        return Ok(Reserve::Existing(existing));
    }
    let bytes = serde_json::to_vec(&candidate).map_err(|e| e.to_string())?;
    match bucket.create(key, bytes.into()).await {
        Ok(_) => Ok(Reserve::Fresh(candidate.id)),
        Err(e) if matches!(e.kind(), kv::CreateErrorKind::AlreadyExists) => get(bucket, key)
            .await?
            .map(Reserve::Existing)
            .ok_or_else(|| "idempotency key vanished while reserving".to_string()),
        Err(e) => Err(e.to_string()),
    }
}

async fn get(bucket: &kv::Store, key: &str) -> Result<Option<Reservation>, String> {
    match bucket.get(key).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("corrupt idempotency record: {e}")),
        Ok(None) => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}
