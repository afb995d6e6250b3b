//! The reports context: read models over several contexts' streams.
//! `author_stats` follows `POSTS` and `COMMENTS`.

pub mod author_stats;
