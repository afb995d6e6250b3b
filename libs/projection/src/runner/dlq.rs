//! Parking poison events to stream `DLQ` (`dlq.<projection>.<STREAM>.<seq>`).

use async_nats::HeaderMap;
use async_nats::jetstream::stream::DirectGetErrorKind;
use eventstore::EventStore;

use crate::Parked;

/// `dlq.<projection>.<STREAM>.<seq>` (docs/api.md): the source stream named,
/// as a projection may follow several.
pub(super) fn dlq_subject(name: &str, stream: &str, seq: u64) -> String {
    format!("dlq.{name}.{stream}.{seq}")
}

/// After a crash between a commit and the DLQ publish, the parked records in
/// the store are the truth: republish the ones the DLQ lacks.
pub(super) async fn reconcile_dlq(
    store: &EventStore,
    name: &str,
    parked: Vec<Parked>,
    out: &mut Vec<Parked>,
) {
    if parked.is_empty() {
        return;
    }
    let Ok(dlq) = store.jetstream().get_stream("DLQ").await else {
        return;
    };
    for p in parked {
        match dlq
            .direct_get_last_for_subject(dlq_subject(name, store.stream_name(), p.seq))
            .await
        {
            Ok(_) => {}
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => out.push(p),
            Err(_) => {}
        }
    }
    deliver_dlq(store, name, out).await;
}

/// Publishes parked events to `dlq.<projection>.<STREAM>.<seq>`, at most one message
/// per subject: the publish expects the subject to be empty, so a re-park
/// (the projection re-applied a tail it had not made durable before a
/// crash, however long ago) is refused by the server instead of stored
/// twice, as is a retry whose first attempt was stored. What fails
/// otherwise stays queued for the next call.
///
/// The copy is the stream's own message, read back by sequence: subject,
/// headers and payload exactly as stored, and the runner keeps no raw
/// headers for the events it applies (parking is rare; receiving is not).
pub(crate) async fn deliver_dlq(store: &EventStore, name: &str, queue: &mut Vec<Parked>) {
    if queue.is_empty() {
        return;
    }
    let stream = match store.jetstream().get_stream(store.stream_name()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(projection = name, error = %e, "DLQ: stream unavailable; will retry");
            return;
        }
    };
    let mut kept = Vec::new();
    for parked in queue.drain(..) {
        let original = match stream.direct_get(parked.seq).await {
            Ok(m) => m,
            Err(e) if matches!(e.kind(), DirectGetErrorKind::NotFound) => {
                tracing::warn!(
                    projection = name,
                    seq = parked.seq,
                    "parked event is no longer in the stream; no DLQ copy"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(projection = name, seq = parked.seq, error = %e, "DLQ: reading the parked event failed; will retry");
                kept.push(parked);
                continue;
            }
        };
        let mut headers = HeaderMap::new();
        for (k, vs) in original.headers.iter() {
            let key: &str = k.as_ref();
            if key.starts_with("Nats-") {
                continue;
            }
            for v in vs {
                headers.append(key, v.as_str());
            }
        }
        headers.insert("Nats-Msg-Id", format!("{name}-{}", parked.seq).as_str());
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        headers.insert("Parked-By", name);
        headers.insert("Parked-Seq", parked.seq.to_string().as_str());
        headers.insert(
            "Parked-Reason",
            parked.reason.replace(['\r', '\n'], " ").as_str(),
        );
        headers.insert("Original-Subject", original.subject.as_str());
        let sent = async {
            store
                .jetstream()
                .publish_with_headers(
                    dlq_subject(name, store.stream_name(), parked.seq),
                    headers,
                    original.payload,
                )
                .await?
                .await
        }
        .await;
        match sent {
            Ok(_) => {}
            Err(e)
                if e.kind()
                    == async_nats::jetstream::context::PublishErrorKind::WrongLastSequence => {}
            Err(e) => {
                tracing::warn!(projection = name, seq = parked.seq, error = %e, "DLQ publish failed; will retry");
                kept.push(parked);
            }
        }
    }
    *queue = kept;
}
