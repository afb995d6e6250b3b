//! The invariants: the stream holds every acknowledged event exactly where
//! the answer said and nothing a refused command asked for; no command took
//! effect twice; the views equal the fold of the oracle's commands in stream
//! order; listing and search agree per author.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, ensure};
use async_nats::jetstream::message::StreamMessage;
use e2e_tests::{StreamReader, msg_header, subject_for};
use futures::StreamExt;
use serde_json::Value;

use crate::support::{CATCH_UP_DEADLINE, Service, get_json, retry, wait_projections_at};
use crate::workload::{COMMON_WORD, Op, Oracle};

/// How long one stream read may keep failing (a server coming back).
const STREAM_READ_DEADLINE: Duration = Duration::from_secs(60);
/// Concurrent view reads while comparing views with the oracle.
const VIEW_READS_IN_FLIGHT_MAX: usize = 8;
/// Page size when counting an author's posts through the listing.
const LIST_PAGE_LIMIT: u64 = 200;
/// Violations quoted in a failure message.
const PROBLEMS_SHOWN_MAX: usize = 25;

/// A copy of the `POSTS` stream read with the message-get API (not the
/// product's direct gets), extended incrementally.
pub struct Mirror {
    reader: StreamReader,
    pub messages: Vec<StreamMessage>,
}

impl Mirror {
    #[must_use]
    pub fn new(reader: StreamReader) -> Self {
        Self {
            reader,
            messages: Vec::new(),
        }
    }

    /// Reads every message up to the current head; returns the head.
    ///
    /// # Errors
    /// When the stream keeps failing or a sequence is missing (the stream
    /// denies deletes, so `1..=last` must all be there).
    pub async fn sync(&mut self) -> anyhow::Result<u64> {
        let reader = self.reader.clone();
        let head = retry("stream head", STREAM_READ_DEADLINE, || reader.last_seq()).await?;
        let stream = retry("get stream", STREAM_READ_DEADLINE, || reader.stream()).await?;
        let from = self.messages.last().map_or(1, |m| m.sequence + 1);
        for seq in from..=head {
            let msg = retry(&format!("get message {seq}"), STREAM_READ_DEADLINE, || {
                let stream = stream.clone();
                async move { Ok(stream.get_raw_message(seq).await?) }
            })
            .await?;
            ensure!(msg.sequence == seq, "asked for {seq}, got {}", msg.sequence);
            self.messages.push(msg);
        }
        Ok(head)
    }
}

/// What the view of one post must show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub version: u64,
    pub title: String,
    pub content: String,
    pub author: String,
    pub deleted: bool,
}

/// The outcome of comparing the oracle with the stream and the views.
#[derive(Debug, Default)]
pub struct Verdict {
    pub expected: BTreeMap<String, Expected>,
    /// Acknowledged events missing from the stream, plus view versions below
    /// the expected ones.
    pub lost: u64,
    /// Commands found twice in the stream, plus view versions above the
    /// expected ones.
    pub duplicates: u64,
    /// Commands whose outcome was unknown and that the stream shows.
    pub uncertain_applied: u64,
    /// Acknowledged updates that changed nothing and appended nothing.
    pub no_ops: u64,
    pub problems: Vec<String>,
}

impl Verdict {
    /// Fails with the first violations.
    ///
    /// # Errors
    /// When any invariant was violated.
    pub fn ensure_clean(&self, when: &str) -> anyhow::Result<()> {
        ensure!(
            self.problems.is_empty() && self.lost == 0 && self.duplicates == 0,
            "{when}: {} violations ({} lost, {} duplicated); first ones:\n{}",
            self.problems.len(),
            self.lost,
            self.duplicates,
            self.problems
                .iter()
                .take(PROBLEMS_SHOWN_MAX)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
        Ok(())
    }
}

fn corr_of(m: &StreamMessage) -> Option<&str> {
    msg_header(m, "Correlation-Id")
}

fn decode(m: &StreamMessage) -> Result<posts::Event, String> {
    let ty = msg_header(m, "Event-Type").ok_or("no Event-Type")?;
    let schema: u32 = msg_header(m, "Event-Schema")
        .ok_or("no Event-Schema")?
        .parse()
        .map_err(|_| "Event-Schema is not a number")?;
    posts::decode(ty, schema, &m.payload).map_err(|e| e.to_string())
}

fn fold(state: Option<Expected>, op: &Op, version: u64) -> Result<Expected, String> {
    match (state, op) {
        (
            None,
            Op::Create {
                title,
                content,
                author,
            },
        ) => Ok(Expected {
            version,
            title: title.clone(),
            content: content.clone(),
            author: author.clone(),
            deleted: false,
        }),
        (
            Some(mut s),
            Op::Update {
                title,
                content,
                author,
            },
        ) if !s.deleted => {
            if let Some(t) = title {
                s.title.clone_from(t);
            }
            if let Some(c) = content {
                s.content.clone_from(c);
            }
            if let Some(a) = author {
                s.author.clone_from(a);
            }
            s.version = version;
            Ok(s)
        }
        (Some(mut s), Op::Delete) if !s.deleted => {
            s.deleted = true;
            s.version = version;
            Ok(s)
        }
        (s, op) => Err(format!("{op:?} cannot follow {s:?}")),
    }
}

/// Compares the oracle with the stream. `ignore` are sequences the test
/// published itself (poison), outside the oracle.
#[must_use]
pub fn reconcile(oracle: &Oracle, messages: &[StreamMessage], ignore: &HashSet<u64>) -> Verdict {
    let mut v = Verdict::default();
    let by_seq: HashMap<u64, &StreamMessage> = messages.iter().map(|m| (m.sequence, m)).collect();
    let corrs: HashSet<&str> = messages.iter().filter_map(corr_of).collect();
    // An update that changes nothing appends nothing and is acknowledged
    // with the post's current version and sequence: checked below, once the
    // post's states are folded.
    let mut no_ops: Vec<&crate::workload::Acked> = Vec::new();
    // Every acknowledged event is in the stream, at the sequence the answer
    // named, on the post's subject, from this very command.
    for a in &oracle.acked {
        match by_seq.get(&a.seq) {
            Some(m)
                if m.subject.as_str() == subject_for(&a.post_id)
                    && corr_of(m) == Some(a.corr.as_str()) => {}
            Some(m)
                if m.subject.as_str() == subject_for(&a.post_id)
                    && !corrs.contains(a.corr.as_str())
                    && matches!(oracle.ops.get(&a.corr), Some(Op::Update { .. })) =>
            {
                no_ops.push(a);
            }
            Some(m) => {
                v.lost += 1;
                v.problems.push(format!(
                    "ack of {} ({} v{}) named seq {}, which holds {} from {:?}",
                    a.corr,
                    a.post_id,
                    a.version,
                    a.seq,
                    m.subject,
                    corr_of(m)
                ));
            }
            None => {
                v.lost += 1;
                v.problems.push(format!(
                    "ack of {} ({} v{}) named seq {}, which the stream does not have",
                    a.corr, a.post_id, a.version, a.seq
                ));
            }
        }
    }
    let acked: HashMap<&str, &crate::workload::Acked> =
        oracle.acked.iter().map(|a| (a.corr.as_str(), a)).collect();
    let uncertain: HashSet<&str> = oracle.uncertain.iter().map(String::as_str).collect();
    let mut per_subject: BTreeMap<&str, Vec<&StreamMessage>> = BTreeMap::new();
    for m in messages.iter().filter(|m| !ignore.contains(&m.sequence)) {
        per_subject.entry(m.subject.as_str()).or_default().push(m);
    }
    let mut seen: HashSet<&str> = HashSet::new();
    let mut seq_versions: HashMap<u64, u64> = HashMap::new();
    let mut states: HashMap<(&str, u64), Expected> = HashMap::new();
    for (subject, msgs) in per_subject {
        let Some(post_id) = subject.strip_prefix("posts.") else {
            v.problems
                .push(format!("message on {subject}, outside posts.<id>"));
            continue;
        };
        let mut state: Option<Expected> = None;
        for (i, m) in msgs.iter().enumerate() {
            let version = i as u64 + 1;
            seq_versions.insert(m.sequence, version);
            let Some(corr) = corr_of(m) else {
                v.problems.push(format!(
                    "seq {} on {subject} has no Correlation-Id",
                    m.sequence
                ));
                continue;
            };
            if !seen.insert(corr) {
                v.duplicates += 1;
                v.problems.push(format!(
                    "command {corr} took effect twice (again at seq {} on {subject})",
                    m.sequence
                ));
            }
            let Some(op) = oracle.ops.get(corr) else {
                v.problems.push(format!(
                    "seq {} on {subject} comes from {corr}, a command that was refused or never sent",
                    m.sequence
                ));
                continue;
            };
            match acked.get(corr) {
                Some(a) if a.post_id != post_id || a.version != version => {
                    v.problems.push(format!(
                        "{corr} was acknowledged as {} v{}, the stream has it as {post_id} v{version}",
                        a.post_id, a.version
                    ));
                }
                Some(_) => {}
                None if uncertain.contains(corr) => v.uncertain_applied += 1,
                None => v
                    .problems
                    .push(format!("{corr}: neither acked nor unknown")),
            }
            match decode(m) {
                Ok(event) if event == op.event() => {}
                Ok(event) => v.problems.push(format!(
                    "seq {} ({corr}) holds {event:?}, the command asked for {:?}",
                    m.sequence,
                    op.event()
                )),
                Err(e) => v
                    .problems
                    .push(format!("seq {} ({corr}) does not decode: {e}", m.sequence)),
            }
            match fold(state.take(), op, version) {
                Ok(s) => {
                    states.insert((post_id, version), s.clone());
                    state = Some(s);
                }
                Err(e) => v
                    .problems
                    .push(format!("{post_id} at seq {}: {e}", m.sequence)),
            }
        }
        if let Some(s) = state {
            v.expected.insert(post_id.to_string(), s);
        }
    }
    // A no-op's ack names the post's event at its version, a live state in
    // which every field the update gave already had that value.
    for a in no_ops {
        let at = seq_versions.get(&a.seq).copied();
        let state = states.get(&(a.post_id.as_str(), a.version));
        let unchanged = match (oracle.ops.get(&a.corr), state) {
            (
                Some(Op::Update {
                    title,
                    content,
                    author,
                }),
                Some(s),
            ) => {
                !s.deleted
                    && title.as_ref().is_none_or(|t| *t == s.title)
                    && content.as_ref().is_none_or(|c| *c == s.content)
                    && author.as_ref().is_none_or(|x| *x == s.author)
            }
            _ => false,
        };
        if at == Some(a.version) && unchanged {
            v.no_ops += 1;
        } else {
            v.lost += 1;
            v.problems.push(format!(
                "ack of {} ({} v{}) named seq {}, another command's event, and was no no-op there",
                a.corr, a.post_id, a.version, a.seq
            ));
        }
    }
    v
}

/// Compares every expected post with the view (`include_deleted=true`).
///
/// # Errors
/// When the query side does not answer.
pub async fn check_views(
    http: &reqwest::Client,
    query: &Service,
    verdict: &mut Verdict,
) -> anyhow::Result<()> {
    let reads = futures::stream::iter(verdict.expected.clone())
        .map(|(id, want)| {
            let url = query.url(&format!("/posts/{id}?include_deleted=true"));
            async move {
                let got = retry(&format!("GET {url}"), CATCH_UP_DEADLINE, || {
                    get_json(http, &url)
                })
                .await;
                (id, want, got)
            }
        })
        .buffer_unordered(VIEW_READS_IN_FLIGHT_MAX)
        .collect::<Vec<_>>()
        .await;
    for (id, want, got) in reads {
        let (status, body) = got?;
        if status == 404 {
            verdict.lost += want.version;
            verdict
                .problems
                .push(format!("{id}: view has no post, expected {want:?}"));
            continue;
        }
        ensure!(status == 200, "GET /posts/{id}: {status} {body}");
        let d = &body["data"];
        let version = d["version"].as_u64().unwrap_or(0);
        if version > want.version {
            verdict.duplicates += version - want.version;
        } else if version < want.version {
            verdict.lost += want.version - version;
        }
        let got = Expected {
            version,
            title: d["title"].as_str().unwrap_or_default().to_string(),
            content: d["content"].as_str().unwrap_or_default().to_string(),
            author: d["author_name"].as_str().unwrap_or_default().to_string(),
            deleted: d["deleted"].as_bool().unwrap_or(false),
        };
        if got != want {
            verdict
                .problems
                .push(format!("{id}: view {got:?}, expected {want:?}"));
        }
    }
    Ok(())
}

/// Live posts per author: the listing, the search totals and the expected
/// views must agree.
///
/// # Errors
/// When the query side does not answer.
pub async fn check_author_counts(
    http: &reqwest::Client,
    query: &Service,
    authors: &[String],
    verdict: &mut Verdict,
) -> anyhow::Result<()> {
    let mut want: BTreeMap<String, u64> = authors.iter().map(|a| (a.clone(), 0)).collect();
    for e in verdict.expected.values() {
        let n = want.entry(e.author.clone()).or_insert(0);
        if !e.deleted {
            *n += 1;
        }
    }
    for (author, expected) in want {
        let listed = count_listed(http, query, &author).await?;
        let url = reqwest::Url::parse_with_params(
            &query.url("/posts/search"),
            &[
                ("q", COMMON_WORD),
                ("author_name", author.as_str()),
                ("limit", "1"),
            ],
        )?;
        let (status, body) = get_json(http, url.as_str()).await?;
        ensure!(status == 200, "search for {author}: {status} {body}");
        let searched = body["total"].as_u64().context("search total")?;
        if listed != expected || searched != expected {
            verdict.problems.push(format!(
                "author {author}: {expected} live posts expected, listing shows {listed}, search total {searched}"
            ));
        }
    }
    Ok(())
}

async fn count_listed(
    http: &reqwest::Client,
    query: &Service,
    author: &str,
) -> anyhow::Result<u64> {
    let mut n = 0;
    let mut cursor: Option<String> = None;
    let mut ids = BTreeSet::new();
    loop {
        let mut params = vec![
            ("author_name", author.to_string()),
            ("limit", LIST_PAGE_LIMIT.to_string()),
        ];
        if let Some(c) = &cursor {
            params.push(("cursor", c.clone()));
        }
        let url = reqwest::Url::parse_with_params(&query.url("/posts"), &params)?;
        let (status, body) = get_json(http, url.as_str()).await?;
        ensure!(status == 200, "list for {author}: {status} {body}");
        for row in body["data"].as_array().context("data")? {
            ensure!(
                row["author_name"].as_str() == Some(author) && row["deleted"] == Value::Bool(false),
                "listing for {author} returned {row}"
            );
            let id = row["post_id"].as_str().context("post_id")?.to_string();
            ensure!(ids.insert(id.clone()), "listing returned {id} twice");
            n += 1;
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Ok(n),
        }
    }
}

/// The full check with the writers paused or stopped: read the stream,
/// reconcile, wait until both projections have applied the head (exactly),
/// compare views and per-author counts. `query` is None where no query side runs.
///
/// # Errors
/// When a service does not answer; violations are in the verdict.
pub async fn verify(
    http: &reqwest::Client,
    mirror: &mut Mirror,
    oracle: &Oracle,
    query: Option<&Service>,
    authors: &[String],
    ignore: &HashSet<u64>,
) -> anyhow::Result<Verdict> {
    let head = mirror.sync().await?;
    let mut verdict = reconcile(oracle, &mirror.messages, ignore);
    if let Some(query) = query {
        let at = wait_projections_at(http, query, head, CATCH_UP_DEADLINE).await?;
        for p in &at {
            if p.checkpoint != head {
                verdict.problems.push(format!(
                    "{} checkpoint {} is past the stream head {head}",
                    p.name, p.checkpoint
                ));
            }
        }
        check_views(http, query, &mut verdict).await?;
        check_author_counts(http, query, authors, &mut verdict).await?;
    }
    Ok(verdict)
}
