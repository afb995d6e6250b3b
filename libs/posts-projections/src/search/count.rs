//! Exact totals: conjunction counts over postings, with cached bitmaps of
//! dense terms.

use std::sync::Arc;

use tantivy::Term;
use tantivy::index::SegmentId;
use tantivy::schema::IndexRecordOption;

/// A term is dense in a segment when at least one document in this many
/// holds it: its bitmap (a bit per document) is then cached for counts.
pub(super) const DENSE_DOCS_PER_HIT: u64 = 64;
/// Bytes of cached bitmaps, least recently used evicted first. A bitmap is
/// a bit per document of its segment: 12.5 KB per term for 100k posts, so
/// this holds the ~700 dense words of `just bench`'s vocabulary about
/// three times over.
pub(super) const DENSE_BITMAPS_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Bitmaps of dense terms per segment, for [`count_conjunction`]. A
/// segment's postings never change, so a bitmap is good for as long as its
/// segment lives (deletes are checked apart); those of merged-away segments
/// age out. Common words make up most queries, and counting with one of
/// them decoded its whole posting list every time: 29% of a search's CPU
/// over `just bench`'s index.
#[derive(Default)]
pub(super) struct DenseBitmaps {
    pub(super) cache: std::sync::Mutex<DenseCache>,
}

pub(super) struct DenseCache {
    pub(super) map: lru::LruCache<(SegmentId, Term), Arc<[u64]>>,
    pub(super) bytes: usize,
}

impl Default for DenseCache {
    fn default() -> Self {
        Self {
            map: lru::LruCache::unbounded(),
            bytes: 0,
        }
    }
}

impl DenseBitmaps {
    /// The bitmap of `term` in `segment`, built from its postings if it is
    /// not cached. The lock is not held while building.
    pub(super) fn get(
        &self,
        segment: &tantivy::SegmentReader,
        term: &Term,
        postings: impl FnOnce() -> tantivy::Result<tantivy::postings::BlockSegmentPostings>,
    ) -> tantivy::Result<Arc<[u64]>> {
        let key = (segment.segment_id(), term.clone());
        if let Some(bits) = self.lock().map.get(&key) {
            return Ok(bits.clone());
        }
        let mut bits = vec![0u64; (segment.max_doc() as usize).div_ceil(64)];
        set_bits(&mut bits, &mut postings()?);
        let bits: Arc<[u64]> = bits.into();
        let mut cache = self.lock();
        cache.bytes += bits.len() * 8;
        if let Some(old) = cache.map.put(key, bits.clone()) {
            cache.bytes -= old.len() * 8;
        }
        while cache.bytes > DENSE_BITMAPS_BYTES_MAX {
            match cache.map.pop_lru() {
                Some((_, old)) => cache.bytes -= old.len() * 8,
                None => break,
            }
        }
        Ok(bits)
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, DenseCache> {
        // A panic while holding it cannot leave the cache inconsistent
        // beyond a byte count; keep serving.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Sets the bit of every document in `postings`, decoding them block by
/// block.
pub(super) fn set_bits(bits: &mut [u64], postings: &mut tantivy::postings::BlockSegmentPostings) {
    loop {
        let docs = postings.docs();
        if docs.is_empty() {
            break;
        }
        for &d in docs {
            bits[(d >> 6) as usize] |= 1 << (d & 63);
        }
        postings.advance();
    }
}

/// Exact number of live documents holding every term. In each segment, a
/// dense term is a cached bitmap ([`DenseBitmaps`]); the sparse terms'
/// postings are decoded block by block, the rarest into a bitmap that each
/// further one narrows, the last one probing it and the dense bitmaps.
/// With no sparse term, the dense bitmaps are intersected a word at a time.
/// Seeking one posting list into another doc by doc, as a generic count
/// does, cost more than ranking itself for queries of common words (about
/// half a millisecond for 4,400 matches out of 100k in `just bench`).
pub(super) fn count_conjunction(
    searcher: &tantivy::Searcher,
    terms: &[Term],
    dense_bitmaps: &DenseBitmaps,
) -> tantivy::Result<usize> {
    let mut total = 0;
    let mut bits: Vec<u64> = Vec::new();
    let mut next: Vec<u64> = Vec::new();
    'segments: for segment in searcher.segment_readers() {
        let mut lists = Vec::with_capacity(terms.len());
        let mut dense = Vec::new();
        for term in terms {
            let inverted = segment.inverted_index(term.field())?;
            let Some(info) = inverted.get_term_info(term)? else {
                continue 'segments; // a term this segment lacks: no match here
            };
            let read = || {
                inverted
                    .read_block_postings_from_terminfo(&info, IndexRecordOption::Basic)
                    .map_err(tantivy::TantivyError::from)
            };
            if u64::from(info.doc_freq) * DENSE_DOCS_PER_HIT >= u64::from(segment.max_doc()) {
                dense.push(dense_bitmaps.get(segment, term, read)?);
            } else {
                lists.push(read()?);
            }
        }
        let alive = segment.alive_bitset();
        let holds = |d: u32| {
            let (w, b) = ((d >> 6) as usize, d & 63);
            dense.iter().all(|bits| (bits[w] >> b) & 1 == 1) && alive.is_none_or(|a| a.is_alive(d))
        };
        if lists.is_empty() {
            let Some((first, rest)) = dense.split_first() else {
                continue;
            };
            for (w, &word) in first.iter().enumerate() {
                let mut x = rest.iter().fold(word, |x, bits| x & bits[w]);
                match alive {
                    None => total += x.count_ones() as usize,
                    Some(alive) => {
                        while x != 0 {
                            let d = (w as u32) << 6 | x.trailing_zeros();
                            total += usize::from(alive.is_alive(d));
                            x &= x - 1;
                        }
                    }
                }
            }
            continue;
        }
        lists.sort_by_key(tantivy::postings::BlockSegmentPostings::doc_freq);
        let words = (segment.max_doc() as usize).div_ceil(64);
        let n = lists.len();
        let plain = dense.is_empty() && alive.is_none();
        for (i, mut postings) in lists.into_iter().enumerate() {
            let last = i + 1 == n;
            if !last {
                next.clear();
                next.resize(words, 0);
            }
            // Tight loops per role: the first list fills the bitmap, middle
            // ones keep what they share with it, the last one counts.
            if i == 0 && !last {
                set_bits(&mut next, &mut postings);
                std::mem::swap(&mut bits, &mut next);
                continue;
            }
            loop {
                let docs = postings.docs();
                if docs.is_empty() {
                    break;
                }
                if !last {
                    for &d in docs {
                        let w = (d >> 6) as usize;
                        next[w] |= bits[w] & (1 << (d & 63));
                    }
                } else if plain && n == 1 {
                    total += docs.len();
                } else if plain {
                    for &d in docs {
                        total += ((bits[(d >> 6) as usize] >> (d & 63)) & 1) as usize;
                    }
                } else {
                    for &d in docs {
                        let held = n == 1 || (bits[(d >> 6) as usize] >> (d & 63)) & 1 == 1;
                        total += usize::from(held && holds(d));
                    }
                }
                postings.advance();
            }
            std::mem::swap(&mut bits, &mut next);
        }
    }
    Ok(total)
}
