//! `Idempotency-Key` for creates: a JetStream KV bucket maps the key to the
//! post id it created. The key is reserved with a create-only KV write before
//! the event is appended, and the append itself expects an empty subject, so a
//! key creates at most one post even across instances and crashes.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const BUCKET: &str = "POSTS_IDEMPOTENCY";
/// How long a key is remembered: a day covers client retry policies.
const KEY_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest accepted `Idempotency-Key`, in bytes.
pub const KEY_BYTES_MAX: usize = 255;

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reservation {
    pub post_id: String,
    /// SHA-256 of the normalised request body: a key reused with another body is refused.
    pub body_sha256: String,
}

pub async fn open_bucket(js: &jetstream::Context, replicas: usize) -> anyhow::Result<kv::Store> {
    if let Ok(store) = js.get_key_value(BUCKET).await {
        return Ok(store);
    }
    Ok(js
        .create_key_value(kv::Config {
            bucket: BUCKET.to_string(),
            description: "Idempotency-Key -> post id for POST /posts".to_string(),
            max_value_size: 1024,
            // Only the reservation matters, never its history.
            history: 1,
            max_age: KEY_TTL,
            max_bytes: -1,
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
        .await?)
}

pub fn key_for(idempotency_key: &str) -> String {
    hex(&Sha256::digest(idempotency_key.as_bytes()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub enum Reserve {
    /// This request reserved the key for `post_id`.
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
        Ok(_) => Ok(Reserve::Fresh(candidate.post_id)),
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
