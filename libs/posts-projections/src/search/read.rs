//! The read side of post-search: query parsing, ranking, paging and
//! snippets (`SearchReader`).

use std::collections::BTreeMap;
use std::sync::Arc;

use projection::Parked;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tantivy::collector::{Count, TopDocs};
use tantivy::index::SegmentId;
use tantivy::query::{
    BooleanQuery, BoostQuery, FuzzyTermQuery, Occur, PhraseQuery, Query, TermQuery,
};
use tantivy::schema::IndexRecordOption;
use tantivy::{DocAddress, DocSet, Index, IndexReader, TantivyDocument, Term};

use crate::hex;
use crate::snippet::Highlighter;

use super::*;

/// A parsed query.
pub(super) struct Parsed {
    /// What ranks the hits.
    pub(super) query: Box<dyn Query>,
    /// Exact terms only, for highlighting.
    pub(super) exact: Box<dyn Query>,
    /// The words expanded to their typo neighbours, with their edit budget,
    /// for highlighting what they matched.
    pub(super) typos: Vec<(String, u8)>,
    /// The query's terms when it is nothing but a conjunction of exact
    /// terms (no phrase, no typo expansion): its matches can be counted
    /// with bitmaps (see [`count_conjunction`]).
    pub(super) conjunction: Option<Vec<Term>>,
}

/// One search hit.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Hit {
    #[schema(format = Uuid)]
    pub post_id: String,
    pub title: String,
    pub author_name: String,
    /// BM25, title boosted: higher is better.
    pub score: f32,
    /// By field name (`title`, `content`): snippets with the matched words
    /// in `<b>` tags, HTML-escaped otherwise. Ordered, so that a hit
    /// serialises the same every time.
    #[schema(value_type = BTreeMap<String, String>)]
    pub highlights: BTreeMap<&'static str, String>,
}

#[derive(Debug, Clone)]
pub struct Results {
    pub hits: Vec<Hit>,
    pub total: usize,
    pub next_offset: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    #[error("query is empty")]
    Empty,
    #[error("query is over {QUERY_BYTES_MAX} bytes")]
    TooLong,
    #[error("query has more than {QUERY_TERMS_MAX} terms")]
    TooManyTerms,
    /// No post can match it: such words are not indexed.
    #[error(
        "{0:?} is {1} bytes long; words of {limit} bytes or more are not indexed, so they cannot be searched",
        limit = crate::tokenizer::TOKEN_BYTES_LIMIT
    )]
    WordTooLong(String, usize),
    #[error("search index: {0}")]
    Index(String),
}

/// The read side, cheap to clone.
#[derive(Clone)]
pub struct SearchReader {
    pub(super) index: Index,
    pub(super) reader: IndexReader,
    pub(super) fields: Fields,
    pub(super) dense_bitmaps: Arc<DenseBitmaps>,
}

/// Edit distance allowed for a word: one typo from five letters, two from nine.
#[must_use]
pub fn typo_budget(word: &str) -> u8 {
    match word.chars().count() {
        0..=4 => 0,
        5..=8 => 1,
        _ => 2,
    }
}

/// Where the page after one of `hits` hits at `offset` starts, if there is
/// more and it is not deeper than [`SEARCH_OFFSET_MAX`].
pub(super) fn next_offset(offset: usize, hits: usize, total: usize) -> Option<usize> {
    let next = offset + hits;
    (hits > 0 && next < total && next <= SEARCH_OFFSET_MAX).then_some(next)
}

/// Splits user text into words and quoted phrases. Never fails: an unclosed
/// quote just ends the phrase at the end of the text.
pub(super) fn split_query(q: &str) -> Vec<(bool, String)> {
    let mut out = Vec::new();
    for (i, part) in q.split('"').enumerate() {
        let is_phrase = i % 2 == 1;
        if is_phrase {
            if !part.trim().is_empty() {
                out.push((true, part.to_string()));
            }
        } else {
            out.extend(part.split_whitespace().map(|w| (false, w.to_string())));
        }
    }
    out
}

impl SearchReader {
    /// The stored document of a post, tombstone included.
    ///
    /// # Errors
    /// When the index cannot be read.
    pub fn get(&self, id: &str) -> Result<Option<Doc>, SearchError> {
        Ok(self
            .locate(&self.reader.searcher(), id)?
            .map(|(_, doc)| doc))
    }

    /// The post's live document and the segment holding it.
    pub(super) fn locate(
        &self,
        searcher: &tantivy::Searcher,
        id: &str,
    ) -> Result<Option<(SegmentId, Doc)>, SearchError> {
        let Some((addr, segment)) = self.find(searcher, id)? else {
            return Ok(None);
        };
        Ok(Some((segment, self.doc(searcher, addr)?)))
    }

    /// Where the post's live document is.
    pub(super) fn find(
        &self,
        searcher: &tantivy::Searcher,
        id: &str,
    ) -> Result<Option<(DocAddress, SegmentId)>, SearchError> {
        // Straight from the id's postings: a scored `TermQuery` built BM25
        // statistics over every segment first, for each update applied.
        let idx = |e: std::io::Error| SearchError::Index(e.to_string());
        let term = Term::from_field_text(self.fields.post_id, id);
        for (ord, segment) in searcher.segment_readers().iter().enumerate() {
            let postings = segment
                .inverted_index(self.fields.post_id)
                .map_err(|e| SearchError::Index(e.to_string()))?
                .read_postings(&term, IndexRecordOption::Basic)
                .map_err(idx)?;
            let Some(mut postings) = postings else {
                continue;
            };
            let mut doc = postings.doc();
            while doc != tantivy::TERMINATED {
                if segment.alive_bitset().is_none_or(|a| a.is_alive(doc)) {
                    let ord = u32::try_from(ord).unwrap_or(u32::MAX);
                    return Ok(Some((DocAddress::new(ord, doc), segment.segment_id())));
                }
                doc = postings.advance();
            }
        }
        Ok(None)
    }

    pub(super) fn doc(
        &self,
        searcher: &tantivy::Searcher,
        addr: DocAddress,
    ) -> Result<Doc, SearchError> {
        let t: TantivyDocument = searcher
            .doc(addr)
            .map_err(|e| SearchError::Index(e.to_string()))?;
        Ok(from_tantivy(&t, self.fields))
    }

    pub(super) fn tokens(&self, text: &str) -> Vec<String> {
        let Ok(mut analyzer) = self.index.tokenizer_for_field(self.fields.text) else {
            return Vec::new();
        };
        let mut stream = analyzer.token_stream(text);
        let mut out = Vec::new();
        while let Some(t) = stream.next() {
            out.push(t.text.clone());
        }
        out
    }

    /// Builds the query: every word or phrase must match title or content
    /// (the `text` field, where the title weighs more), words with typo
    /// tolerance; optional exact author filter.
    ///
    /// A word is expanded to its typo neighbours only when the index does not
    /// hold it as typed: building Levenshtein automata for every word of every
    /// query cost most of a search's CPU (~0.7 ms/query in `just bench`), and
    /// a word the index knows was not a typo.
    pub(super) fn build_query(
        &self,
        searcher: &tantivy::Searcher,
        q: &str,
        author: Option<&str>,
    ) -> Result<Parsed, SearchError> {
        if q.len() > QUERY_BYTES_MAX {
            return Err(SearchError::TooLong);
        }
        let parts = split_query(q);
        if parts.len() > QUERY_TERMS_MAX {
            return Err(SearchError::TooManyTerms);
        }
        // The analyzer would drop such a word, and the query would then ask
        // for less than "every word": refuse it, saying why.
        if let Some(word) = parts
            .iter()
            .flat_map(|(_, text)| text.split(|c: char| !c.is_alphanumeric()))
            .find(|w| w.len() >= crate::tokenizer::TOKEN_BYTES_LIMIT)
        {
            return Err(SearchError::WordTooLong(word.to_string(), word.len()));
        }
        let f = self.fields;
        let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        // Exact terms only, for highlighting.
        let mut exact: Vec<(Occur, Box<dyn Query>)> = Vec::new();
        let mut typos = Vec::new();
        let mut conjunction = Some(Vec::new());
        // Counted after the analyzer split the parts: "a-b-c" is one part but
        // three terms, and a whitespace count let a 512-byte query of
        // hyphen-joined typos ask for ~46 fuzzy terms.
        let parts: Vec<(bool, Vec<String>)> = parts
            .into_iter()
            .map(|(is_phrase, text)| (is_phrase, self.tokens(&text)))
            .collect();
        if parts.iter().map(|(_, t)| t.len()).sum::<usize>() > QUERY_TERMS_MAX {
            return Err(SearchError::TooManyTerms);
        }
        for (is_phrase, tokens) in parts {
            if tokens.is_empty() {
                continue;
            }
            let terms: Vec<Term> = tokens
                .iter()
                .map(|t| Term::from_field_text(f.text, t))
                .collect();
            if is_phrase && terms.len() > 1 {
                conjunction = None;
                let phrase: Box<dyn Query> = Box::new(PhraseQuery::new(terms));
                exact.push((Occur::Should, phrase.box_clone()));
                clauses.push((Occur::Must, phrase));
                continue;
            }
            for (term, token) in terms.into_iter().zip(&tokens) {
                let exact_q: Box<dyn Query> =
                    Box::new(TermQuery::new(term.clone(), IndexRecordOption::WithFreqs));
                exact.push((Occur::Should, exact_q.box_clone()));
                let budget = typo_budget(token);
                let in_index = searcher.doc_freq(&term).is_ok_and(|n| n > 0);
                // Past FUZZY_TERMS_MAX typos, a word matches as typed: each
                // fuzzy term walks a Levenshtein automaton over the term
                // dictionary, and highlights compare every word of every hit.
                if budget > 0 && !is_phrase && !in_index && typos.len() < FUZZY_TERMS_MAX {
                    conjunction = None;
                    typos.push((token.clone(), budget));
                    let fuzzy: Box<dyn Query> = Box::new(BoostQuery::new(
                        Box::new(FuzzyTermQuery::new(term, budget, true)),
                        FUZZY_WEIGHT,
                    ));
                    clauses.push((
                        Occur::Must,
                        Box::new(BooleanQuery::new(vec![
                            (Occur::Should, exact_q),
                            (Occur::Should, fuzzy),
                        ])),
                    ));
                } else {
                    if let Some(c) = &mut conjunction {
                        c.push(term);
                    }
                    clauses.push((Occur::Must, exact_q));
                }
            }
        }
        if !clauses.iter().any(|(o, _)| *o == Occur::Must) {
            return Err(SearchError::Empty);
        }
        if let Some(a) = author {
            let term = Term::from_field_text(f.author_name, a);
            if let Some(c) = &mut conjunction {
                c.push(term.clone());
            }
            clauses.push((
                Occur::Must,
                Box::new(TermQuery::new(term, IndexRecordOption::Basic)),
            ));
        }
        Ok(Parsed {
            query: Box::new(BooleanQuery::new(clauses)),
            exact: Box::new(BooleanQuery::new(exact)),
            typos,
            conjunction,
        })
    }

    /// BM25-ranked search with typo tolerance, phrases and highlights.
    ///
    /// # Errors
    /// [`SearchError`] for an empty, too long or too wide query.
    pub fn search(
        &self,
        q: &str,
        author: Option<&str>,
        limit: usize,
        offset: usize,
    ) -> Result<Results, SearchError> {
        let searcher = self.reader.searcher();
        let Parsed {
            query,
            exact,
            typos,
            conjunction,
        } = self.build_query(&searcher, q, author)?;
        let idx = |e: tantivy::TantivyError| SearchError::Index(e.to_string());
        // Two passes: ranking alone lets tantivy prune (block-max WAND over
        // a term intersection) instead of scoring every match; the exact
        // total is counted apart, without scores.
        let top = searcher
            .search(
                &query,
                &TopDocs::with_limit(limit)
                    .and_offset(offset)
                    .order_by_score(),
            )
            .map_err(idx)?;
        let total = match &conjunction {
            Some(terms) => count_conjunction(&searcher, terms, &self.dense_bitmaps).map_err(idx)?,
            None => searcher.search(&query, &Count).map_err(idx)?,
        };
        // One highlighter over the matched field; each stored text is cut and
        // highlighted with it, typo matches too.
        let mut snippets = Highlighter::new(
            &searcher,
            &*exact,
            &typos,
            self.fields.text,
            SNIPPET_CHARS_MAX,
        )
        .map_err(idx)?;
        let mut hits = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let t: TantivyDocument = searcher.doc(addr).map_err(idx)?;
            let d = from_tantivy(&t, self.fields);
            let mut highlights = BTreeMap::new();
            for (name, text) in [("title", &d.title), ("content", &d.content)] {
                if let Some(html) = snippets.html(text) {
                    highlights.insert(name, html);
                }
            }
            hits.push(Hit {
                post_id: d.post_id,
                title: d.title,
                author_name: d.author_name,
                score,
                highlights,
            });
        }
        let next_offset = next_offset(offset, hits.len(), total);
        Ok(Results {
            hits,
            total,
            next_offset,
        })
    }

    /// Checkpoint of the last commit.
    ///
    /// # Errors
    /// When the index meta cannot be read.
    pub fn checkpoint(&self) -> Result<u64, SearchError> {
        Ok(self.payload()?.checkpoint)
    }

    /// The most recent parked events of the last commit, newest first.
    ///
    /// # Errors
    /// When the index meta cannot be read.
    pub fn parked_recent(&self) -> Result<Vec<Parked>, SearchError> {
        let mut v = self.payload()?.parked_recent;
        v.reverse();
        Ok(v)
    }

    pub(super) fn payload(&self) -> Result<CommitPayload, SearchError> {
        let payload: CommitPayload = self
            .index
            .load_metas()
            .map_err(|e| SearchError::Index(e.to_string()))?
            .payload
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|e| SearchError::Index(e.to_string()))?
            .unwrap_or_default();
        Ok(payload)
    }

    /// Every stored document, in post id order.
    ///
    /// # Errors
    /// When the index cannot be read.
    pub fn all_docs(&self) -> Result<Vec<Doc>, SearchError> {
        let searcher = self.reader.searcher();
        let idx = |e: tantivy::TantivyError| SearchError::Index(e.to_string());
        let mut docs = Vec::new();
        for (ord, segment) in searcher.segment_readers().iter().enumerate() {
            let store = segment
                .get_store_reader(64)
                .map_err(|e| SearchError::Index(e.to_string()))?;
            for doc_id in segment.doc_ids_alive() {
                let t: TantivyDocument = store.get(doc_id).map_err(idx)?;
                let _ = ord;
                docs.push(from_tantivy(&t, self.fields));
            }
        }
        docs.sort_by(|a, b| a.post_id.cmp(&b.post_id));
        Ok(docs)
    }

    /// Live posts per author, for cross-checks against the view.
    ///
    /// # Errors
    /// When the index cannot be read.
    pub fn live_by_author(&self) -> Result<std::collections::BTreeMap<String, u64>, SearchError> {
        let mut out = std::collections::BTreeMap::new();
        for d in self.all_docs()? {
            if !d.deleted {
                *out.entry(d.author_name).or_insert(0) += 1;
            }
        }
        Ok(out)
    }

    /// SHA-256 over the stored document set in post id order and the checkpoint.
    ///
    /// # Errors
    /// When the index cannot be read.
    pub fn digest(&self) -> Result<String, SearchError> {
        let mut h = Sha256::new();
        for d in self.all_docs()? {
            for s in [&d.post_id, &d.title, &d.content, &d.author_name] {
                h.update((s.len() as u64).to_le_bytes());
                h.update(s.as_bytes());
            }
            h.update(d.created_at_us.to_le_bytes());
            h.update(d.updated_at_us.to_le_bytes());
            h.update(d.version.to_le_bytes());
            h.update([u8::from(d.deleted)]);
        }
        h.update(self.checkpoint()?.to_le_bytes());
        Ok(hex(&h.finalize()))
    }
}
