//! The blog post domain: commands, events, `decide` and `apply`. Pure: no IO,
//! no async, no redb, tantivy or HTTP types; [`context`] declares the
//! stream and the aggregate for the platform's generic crates.
//!
//! ```
//! use posts::{Command, Event, PostState, decide, apply};
//! let create = Command::Create { title: "Hello".into(), content: "World".into(), author_name: "ann".into() };
//! let events = decide(&PostState::Absent, &create).unwrap();
//! let state = apply(PostState::Absent, &events[0]).unwrap();
//! assert!(matches!(state, PostState::Live(_)));
//! ```

mod codec;
pub mod context;
mod domain;
pub mod text;

pub use codec::{DecodeError, decode, encode};
pub use context::PostAggregate;
pub use domain::{
    AUTHOR_NAME_CHARS_MAX, CONTENT_BYTES_MAX, Command, Event, InvariantViolation, Post, PostState,
    Rejection, TITLE_CHARS_MAX, apply, decide, normalize_author_name, normalize_content,
    normalize_title,
};
