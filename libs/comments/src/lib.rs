//! The comments context: comments on posts. Commands, events, `decide`,
//! `apply`, and the decision of the `post-deleted-cascade` process manager.
//! Pure: no IO, no async. It knows the posts context only through the
//! events of stream `POSTS` (whether a post exists or is deleted), never
//! through another service's store.
//!
//! ```
//! use comments::{Command, CommentState, PostStatus, decide, apply};
//! let add = Command::Add {
//!     post_id: "p".into(),
//!     post: PostStatus::Live,
//!     body: "Nice post".into(),
//!     author_name: "bo".into(),
//! };
//! let events = decide(&CommentState::Absent, &add).unwrap();
//! let state = apply(CommentState::Absent, &events[0]).unwrap();
//! assert!(matches!(state, CommentState::Live(_)));
//! ```

mod codec;
pub mod context;
mod domain;

pub use codec::{DecodeError, decode, encode};
pub use context::CommentAggregate;
pub use domain::{
    AUTHOR_NAME_CHARS_MAX, BODY_BYTES_MAX, Command, Comment, CommentState, Event,
    InvariantViolation, PostStatus, Rejection, RemovalReason, apply, cascade, decide,
};
