//! The document post-search hands to tantivy: the post itself, shared, not
//! a copy. A `TantivyDocument` owns every value, and the post's content goes
//! in twice (stored, and in the searched `text` field after the title): a
//! copy of 200 KB per 100 KB post, which sat in tantivy's indexing queue
//! (up to 10k documents) until the indexing threads got to it. A catch-up
//! of 100 KB posts peaked at 250 MB of such copies (heaptrack, `bench
//! --only catchup --content-bytes 100000`). This document borrows its
//! values from the `Arc<Doc>` that `pending` keeps anyway.

use std::sync::Arc;

use tantivy::Document;
use tantivy::schema::document::{ReferenceValue, ReferenceValueLeaf};
use tantivy::schema::{Field, Value};

use super::{Doc, Fields, TITLE_REPEAT};

/// One post, as tantivy indexes and stores it.
#[derive(Clone)]
pub(crate) struct PostDoc {
    doc: Arc<Doc>,
    f: Fields,
}

impl std::fmt::Debug for PostDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostDoc")
            .field("post_id", &self.doc.post_id)
            .finish_non_exhaustive()
    }
}

impl PostDoc {
    pub(crate) fn new(doc: Arc<Doc>, f: Fields) -> Self {
        Self { doc, f }
    }
}

/// A value of a [`PostDoc`], borrowed from it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PostValue<'a> {
    Str(&'a str),
    I64(i64),
    U64(u64),
}

impl<'a> Value<'a> for PostValue<'a> {
    type ArrayIter = std::iter::Empty<Self>;
    type ObjectIter = std::iter::Empty<(&'a str, Self)>;

    fn as_value(&self) -> ReferenceValue<'a, Self> {
        ReferenceValue::Leaf(match *self {
            Self::Str(s) => ReferenceValueLeaf::Str(s),
            Self::I64(v) => ReferenceValueLeaf::I64(v),
            Self::U64(v) => ReferenceValueLeaf::U64(v),
        })
    }
}

/// Fields and values of a live post: id, title, content, the title
/// [`TITLE_REPEAT`] times and the content in `text`, author, four numbers.
const VALUES_MAX: usize = 5 + TITLE_REPEAT + 4;

impl Document for PostDoc {
    type Value<'a> = PostValue<'a>;
    type FieldsValuesIter<'a> = std::vec::IntoIter<(Field, PostValue<'a>)>;

    fn iter_fields_and_values(&self) -> Self::FieldsValuesIter<'_> {
        let (d, f) = (&*self.doc, self.f);
        let mut v = Vec::with_capacity(VALUES_MAX);
        v.push((f.post_id, PostValue::Str(&d.post_id)));
        if !d.deleted {
            v.push((f.title, PostValue::Str(&d.title)));
            v.push((f.content, PostValue::Str(&d.content)));
            for _ in 0..TITLE_REPEAT {
                v.push((f.text, PostValue::Str(&d.title)));
            }
            v.push((f.text, PostValue::Str(&d.content)));
            v.push((f.author_name, PostValue::Str(&d.author_name)));
        }
        v.push((f.created_at, PostValue::I64(d.created_at_us)));
        v.push((f.updated_at, PostValue::I64(d.updated_at_us)));
        v.push((f.version, PostValue::U64(d.version)));
        v.push((f.deleted, PostValue::U64(u64::from(d.deleted))));
        v.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::search::{WRITER_HEAP_LIVE_BYTES, open};

    fn doc(deleted: bool) -> Doc {
        Doc {
            post_id: "p-1".into(),
            title: "Title".into(),
            content: "Body text".into(),
            author_name: "ann".into(),
            created_at_us: 10,
            updated_at_us: 20,
            version: 3,
            deleted,
        }
    }

    /// The layout the index was written with before PostDoc (a
    /// `TantivyDocument` built field by field): the same fields, values and
    /// order, so existing indexes read and merge as before.
    #[test]
    fn a_post_doc_has_the_fields_and_values_of_the_owned_document() {
        let dir = tempfile::tempdir().unwrap();
        let (_p, reader) = open(dir.path(), WRITER_HEAP_LIVE_BYTES).unwrap();
        let f = reader.fields;
        let s = |v: &str| format!("Str({v:?})");
        let live: Vec<(Field, String)> = PostDoc::new(Arc::new(doc(false)), f)
            .iter_fields_and_values()
            .map(|(field, v)| (field, format!("{v:?}")))
            .collect();
        let mut want = vec![
            (f.post_id, s("p-1")),
            (f.title, s("Title")),
            (f.content, s("Body text")),
        ];
        want.extend((0..TITLE_REPEAT).map(|_| (f.text, s("Title"))));
        want.extend([
            (f.text, s("Body text")),
            (f.author_name, s("ann")),
            (f.created_at, "I64(10)".into()),
            (f.updated_at, "I64(20)".into()),
            (f.version, "U64(3)".into()),
            (f.deleted, "U64(0)".into()),
        ]);
        assert_eq!(live, want);
        let deleted: Vec<(Field, String)> = PostDoc::new(Arc::new(doc(true)), f)
            .iter_fields_and_values()
            .map(|(field, v)| (field, format!("{v:?}")))
            .collect();
        assert_eq!(
            deleted,
            [
                (f.post_id, s("p-1")),
                (f.created_at, "I64(10)".into()),
                (f.updated_at, "I64(20)".into()),
                (f.version, "U64(3)".into()),
                (f.deleted, "U64(1)".into()),
            ]
        );
    }
}
