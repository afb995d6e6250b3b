//! Deterministic blog posts built from a generated vocabulary, and the
//! JetStream envelope exactly as `posts-command` writes it.
//!
//! Everything is a pure function of (post index, revision), so the search
//! phase can rebuild any post's final text and ask for words it really holds.

use std::collections::HashSet;

use async_nats::HeaderMap;
use bytes::Bytes;
use eventstore::{
    HEADER_CAUSATION_ID, HEADER_CORRELATION_ID, HEADER_EVENT_SCHEMA, HEADER_EVENT_TYPE,
    HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE, HEADER_MSG_ID, HEADER_OCCURRED_AT,
};
use posts::Event;

/// Distinct words posts are written with: enough for BM25 to discriminate,
/// few enough that two words taken from one post also occur in others.
const VOCABULARY_WORDS: usize = 4096;
/// Word frequencies follow Zipf's law like natural text: the most common word
/// is in nearly every post, the rarest in a handful.
const ZIPF_EXPONENT: f64 = 1.0;
/// Authors posts are spread over.
const AUTHORS: u64 = 500;
const TITLE_WORDS_MIN: u64 = 3;
const TITLE_WORDS_MAX: u64 = 8;
/// About 70 words, ~500 bytes of content: a short blog post or a long comment.
const CONTENT_WORDS_MIN: u64 = 40;
const CONTENT_WORDS_MAX: u64 = 100;
const SENTENCE_WORDS_MIN: u64 = 6;
const SENTENCE_WORDS_MAX: u64 = 14;
/// One post in this many is deleted by its last event (when it has more than one).
const DELETE_ONE_IN: u64 = 100;
/// One update in this many also changes the title.
const TITLE_CHANGE_ONE_IN: u64 = 4;
/// The vocabulary's seed: fixed, so every run writes the same corpus.
const VOCABULARY_SEED: u64 = 0x005e_ed0f_b10c;

/// SplitMix64: tiny, fast and deterministic; statistical quality is plenty for text.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        let wide = u128::from(self.next_u64()) * u128::from(n);
        u64::try_from(wide >> 64).unwrap_or(0)
    }

    /// Uniform in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        #[allow(
            clippy::cast_precision_loss,
            reason = "53 random bits fit an f64 mantissa exactly"
        )]
        let v = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        v
    }
}

/// The SplitMix64 finaliser: a good 64-bit hash of a counter.
#[must_use]
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Generated pronounceable words with Zipf-distributed frequencies.
pub struct Vocabulary {
    words: Vec<String>,
    /// Cumulative probability of ranks `0..=i`.
    cdf: Vec<f64>,
}

impl Default for Vocabulary {
    fn default() -> Self {
        Self::new()
    }
}

impl Vocabulary {
    #[must_use]
    pub fn new() -> Self {
        const CONSONANTS: &[u8] = b"bcdfghjklmnprstvz";
        const VOWELS: &[u8] = b"aeiou";
        let mut rng = Rng::new(VOCABULARY_SEED);
        let mut seen = HashSet::new();
        let mut words = Vec::with_capacity(VOCABULARY_WORDS);
        while words.len() < VOCABULARY_WORDS {
            let syllables = rng.between(2, 4);
            let mut w = String::new();
            for _ in 0..syllables {
                w.push(char::from(CONSONANTS[pick(&mut rng, CONSONANTS.len())]));
                w.push(char::from(VOWELS[pick(&mut rng, VOWELS.len())]));
            }
            if rng.below(3) == 0 {
                w.push(char::from(CONSONANTS[pick(&mut rng, CONSONANTS.len())]));
            }
            if seen.insert(w.clone()) {
                words.push(w);
            }
        }
        let mut cdf = Vec::with_capacity(VOCABULARY_WORDS);
        let mut total = 0.0;
        for rank in 1..=VOCABULARY_WORDS {
            #[allow(
                clippy::cast_precision_loss,
                reason = "ranks are below 2^52, exact in f64"
            )]
            let r = rank as f64;
            total += 1.0 / r.powf(ZIPF_EXPONENT);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Self { words, cdf }
    }

    pub fn sample(&self, rng: &mut Rng) -> &str {
        let u = rng.unit();
        let rank = self
            .cdf
            .partition_point(|c| *c < u)
            .min(self.words.len() - 1);
        &self.words[rank]
    }
}

fn pick(rng: &mut Rng, len: usize) -> usize {
    usize::try_from(rng.below(len as u64)).unwrap_or(0)
}

/// The three fields of a post, already normalised (no surrounding whitespace).
#[derive(Debug, Clone)]
pub struct PostText {
    pub title: String,
    pub content: String,
    pub author_name: String,
}

fn capitalised(word: &str) -> String {
    let mut c = word.chars();
    c.next()
        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
        .unwrap_or_default()
}

/// Content padded to about this many bytes (`bench --content-bytes`); 0:
/// as generated. Set once, before the corpus is used.
static CONTENT_BYTES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Pads every post's content to about `bytes` from now on (its own words
/// repeated), for runs with big posts.
pub fn set_content_bytes(bytes: usize) {
    let _ = CONTENT_BYTES.set(bytes);
}

/// `content` repeated, sentence by sentence, to at most `bytes` (the
/// words a search finds stay the same).
fn padded(content: String) -> String {
    let bytes = CONTENT_BYTES.get().copied().unwrap_or(0);
    if content.len() >= bytes {
        return content;
    }
    let mut out = String::with_capacity(bytes);
    while out.len() + content.len() < bytes {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&content);
    }
    if out.is_empty() { content } else { out }
}

/// The text of post `post_index` at `revision` (0 = as created).
#[must_use]
pub fn post_text(vocab: &Vocabulary, post_index: u64, revision: u64) -> PostText {
    let mut rng = Rng::new(mix(post_index) ^ mix(revision.wrapping_add(0xA11CE)));
    let n_title = rng.between(TITLE_WORDS_MIN, TITLE_WORDS_MAX);
    let title_words: Vec<String> = (0..n_title)
        .map(|i| {
            let w = vocab.sample(&mut rng);
            if i == 0 {
                capitalised(w)
            } else {
                w.to_string()
            }
        })
        .collect();
    let n_content = rng.between(CONTENT_WORDS_MIN, CONTENT_WORDS_MAX);
    let mut content = String::with_capacity(usize::try_from(n_content * 8).unwrap_or(0));
    let mut left_in_sentence = 0;
    for _ in 0..n_content {
        let w = vocab.sample(&mut rng);
        if left_in_sentence == 0 {
            if !content.is_empty() {
                content.push_str(". ");
            }
            content.push_str(&capitalised(w));
            left_in_sentence = rng.between(SENTENCE_WORDS_MIN, SENTENCE_WORDS_MAX);
        } else {
            content.push(' ');
            content.push_str(w);
        }
        left_in_sentence -= 1;
    }
    content.push('.');
    PostText {
        title: title_words.join(" "),
        content: padded(content),
        author_name: format!("author-{:03}", mix(post_index ^ 0xA07) % AUTHORS),
    }
}

/// How the backlog is laid out: round 0 creates `posts` posts, every later
/// round updates each of them once (the last event of 1 in 100 posts is a
/// delete), until `events` events are written. Needs `0 < posts <= events`.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub events: u64,
    pub posts: u64,
}

impl Layout {
    #[must_use]
    pub fn rounds(&self) -> u64 {
        self.events.div_ceil(self.posts)
    }

    #[must_use]
    pub fn posts_in_round(&self, round: u64) -> u64 {
        self.posts.min(self.events - round * self.posts)
    }

    fn last_round(&self, post_index: u64) -> u64 {
        (self.events - 1 - post_index) / self.posts
    }

    #[must_use]
    pub fn is_deleted(&self, post_index: u64) -> bool {
        self.last_round(post_index) >= 1 && mix(post_index ^ 0xDE1).is_multiple_of(DELETE_ONE_IN)
    }

    /// The event post `post_index` gets in `round`.
    #[must_use]
    pub fn event(&self, vocab: &Vocabulary, post_index: u64, round: u64) -> Event {
        if round == 0 {
            let t = post_text(vocab, post_index, 0);
            return Event::Created {
                title: t.title,
                content: t.content,
                author_name: t.author_name,
            };
        }
        if round == self.last_round(post_index) && self.is_deleted(post_index) {
            return Event::Deleted;
        }
        let t = post_text(vocab, post_index, round);
        Event::Updated {
            title: mix(post_index ^ mix(round))
                .is_multiple_of(TITLE_CHANGE_ONE_IN)
                .then_some(t.title),
            content: Some(t.content),
            author_name: None,
        }
    }

    /// The content a live post ends with (every update sets the content).
    #[must_use]
    pub fn final_content(&self, vocab: &Vocabulary, post_index: u64) -> String {
        post_text(vocab, post_index, self.last_round(post_index)).content
    }
}

/// `n` two-word queries, each made of two distinct words of one live post's
/// final content, so every query has at least one hit.
#[must_use]
pub fn search_queries(vocab: &Vocabulary, layout: &Layout, n: usize, seed: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let i = rng.below(layout.posts);
        if layout.is_deleted(i) {
            continue;
        }
        let content = layout.final_content(vocab, i).to_ascii_lowercase();
        let mut words: Vec<&str> = content
            .split(|c: char| !c.is_ascii_alphabetic())
            .filter(|w| !w.is_empty())
            .collect();
        words.sort_unstable();
        words.dedup();
        if words.len() < 2 {
            continue;
        }
        let a = pick(&mut rng, words.len());
        let mut b = pick(&mut rng, words.len() - 1);
        if b >= a {
            b += 1;
        }
        out.push(format!("{} {}", words[a], words[b]));
    }
    out
}

/// Headers exactly as `posts-command` writes them (see `eventstore`'s
/// envelope): a fresh event id, the expected last subject sequence, type,
/// schema, time and the correlation and causation ids.
#[must_use]
pub fn headers(event_type: &str, schema: u32, expected_last_subject_seq: u64) -> HeaderMap {
    let mut h = unchecked_headers(event_type, schema);
    h.insert(
        HEADER_EXPECTED_LAST_SUBJECT_SEQUENCE,
        expected_last_subject_seq.to_string().as_str(),
    );
    h
}

/// [`headers`] without the expected last subject sequence: for a history
/// written by one publisher, pipelined.
#[must_use]
pub fn unchecked_headers(event_type: &str, schema: u32) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HEADER_MSG_ID, uuid::Uuid::now_v7().to_string().as_str());
    h.insert(HEADER_EVENT_TYPE, event_type);
    h.insert(HEADER_EVENT_SCHEMA, schema.to_string().as_str());
    h.insert(
        HEADER_OCCURRED_AT,
        eventstore::format_rfc3339(time::OffsetDateTime::now_utc()).as_str(),
    );
    h.insert(
        HEADER_CORRELATION_ID,
        uuid::Uuid::now_v7().to_string().as_str(),
    );
    h.insert(
        HEADER_CAUSATION_ID,
        uuid::Uuid::now_v7().to_string().as_str(),
    );
    h
}

/// Posts for the create benchmarks, as HTTP bodies and as the postcard
/// payloads `posts-command` stores for them (same text, same sizes).
pub struct CreatePool {
    pub bodies: Vec<Bytes>,
    pub payloads: Vec<Bytes>,
    pub event_type: &'static str,
    pub schema: u32,
}

/// Distinct posts cycled through by the create benchmarks.
const CREATE_POOL_POSTS: u64 = 1024;
/// Offset so the pool's posts are not the backlog's.
const CREATE_POOL_FIRST_INDEX: u64 = 1 << 40;

impl CreatePool {
    #[must_use]
    pub fn new(vocab: &Vocabulary) -> Self {
        let mut bodies = Vec::new();
        let mut payloads = Vec::new();
        let mut event_type = "PostCreated";
        let mut schema = 1;
        for i in 0..CREATE_POOL_POSTS {
            let t = post_text(vocab, CREATE_POOL_FIRST_INDEX + i, 0);
            let body = serde_json::json!({
                "title": t.title,
                "content": t.content,
                "author_name": t.author_name,
            });
            bodies.push(Bytes::from(body.to_string()));
            let (ty, sc, bytes) = posts::encode(&Event::Created {
                title: t.title,
                content: t.content,
                author_name: t.author_name,
            });
            event_type = ty;
            schema = sc;
            payloads.push(Bytes::from(bytes));
        }
        Self {
            bodies,
            payloads,
            event_type,
            schema,
        }
    }

    #[must_use]
    pub fn mean_payload_bytes(&self) -> usize {
        self.payloads.iter().map(Bytes::len).sum::<usize>() / self.payloads.len().max(1)
    }

    #[must_use]
    pub fn mean_body_bytes(&self) -> usize {
        self.bodies.iter().map(Bytes::len).sum::<usize>() / self.bodies.len().max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posts_are_valid_and_deterministic() {
        let vocab = Vocabulary::new();
        let a = post_text(&vocab, 7, 0);
        let b = post_text(&vocab, 7, 0);
        assert_eq!(a.content, b.content);
        let cmd = posts::Command::Create {
            title: a.title.clone(),
            content: a.content.clone(),
            author_name: a.author_name.clone(),
        };
        let events = posts::decide(&posts::PostState::Absent, &cmd).expect("valid post");
        assert_eq!(
            events[0],
            Event::Created {
                title: a.title,
                content: a.content,
                author_name: a.author_name
            }
        );
    }

    #[test]
    fn layout_covers_every_event_once() {
        let layout = Layout {
            events: 5_000,
            posts: 2_000,
        };
        let total: u64 = (0..layout.rounds()).map(|r| layout.posts_in_round(r)).sum();
        assert_eq!(total, 5_000);
        assert_eq!(layout.rounds(), 3);
        // Post 999 is in round 2, post 1000 is not.
        assert_eq!(layout.last_round(999), 2);
        assert_eq!(layout.last_round(1000), 1);
    }

    #[test]
    fn queries_use_words_of_live_posts() {
        let vocab = Vocabulary::new();
        let layout = Layout {
            events: 300,
            posts: 100,
        };
        // The words of each live post's final content, apart from the
        // queries' own derivation of them.
        let live: Vec<std::collections::HashSet<String>> = (0..layout.posts)
            .filter(|&i| !layout.is_deleted(i))
            .map(|i| {
                layout
                    .final_content(&vocab, i)
                    .split(|c: char| !c.is_ascii_alphabetic())
                    .filter(|w| !w.is_empty())
                    .map(str::to_ascii_lowercase)
                    .collect()
            })
            .collect();
        for q in search_queries(&vocab, &layout, 20, 1) {
            let words: Vec<&str> = q.split(' ').collect();
            assert_eq!(words.len(), 2, "{q:?}");
            assert_ne!(words[0], words[1], "{q:?}");
            assert!(
                live.iter()
                    .any(|post| words.iter().all(|w| post.contains(*w))),
                "no live post has both words of {q:?}"
            );
        }
    }
}
