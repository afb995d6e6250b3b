use serde::{Deserialize, Serialize};

/// Title bound, in Unicode scalar values after trimming surrounding whitespace.
pub const TITLE_CHARS_MAX: usize = 200;
/// Author bound, in Unicode scalar values after trimming surrounding whitespace.
pub const AUTHOR_NAME_CHARS_MAX: usize = 100;
/// Content bound, in UTF-8 bytes, kept exactly as sent (Markdown needs its
/// whitespace); it must contain at least one non-whitespace character.
pub const CONTENT_BYTES_MAX: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Post {
    pub title: String,
    pub content: String,
    pub author_name: String,
}

/// The state of one post aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum PostState {
    #[default]
    Absent,
    Live(Post),
    Deleted(Post),
}

/// What a client asks for. Field values arrive raw; `decide` normalises them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Create {
        title: String,
        content: String,
        author_name: String,
    },
    Update {
        title: Option<String>,
        content: Option<String>,
        author_name: Option<String>,
    },
    Delete,
}

/// What happened. Each variant has a stable name and schema number (see codec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    Created {
        title: String,
        content: String,
        author_name: String,
    },
    /// Only the fields that changed are `Some`.
    Updated {
        title: Option<String>,
        content: Option<String>,
        author_name: Option<String>,
    },
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("post already exists")]
    AlreadyExists,
    #[error("post not found")]
    NotFound,
    #[error("post is deleted")]
    Deleted,
    #[error("an update must set at least one of title, content, author_name")]
    EmptyUpdate,
    #[error("{field} {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// An event that cannot follow the state it is applied to: corrupt history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} cannot follow a post that is {state}")]
pub struct InvariantViolation {
    pub event: &'static str,
    pub state: &'static str,
}

impl From<crate::text::FieldError> for Rejection {
    fn from(e: crate::text::FieldError) -> Self {
        Rejection::Invalid {
            field: e.field,
            reason: e.reason,
        }
    }
}

fn check_text(field: &'static str, value: &str, max_chars: usize) -> Result<String, Rejection> {
    Ok(crate::text::line(field, value, max_chars)?)
}

/// Trims surrounding whitespace and checks 1..=200 characters, no control characters.
///
/// # Errors
/// [`Rejection::Invalid`] naming the field.
pub fn normalize_title(value: &str) -> Result<String, Rejection> {
    check_text("title", value, TITLE_CHARS_MAX)
}

/// Trims surrounding whitespace and checks 1..=100 characters, no control characters.
///
/// # Errors
/// [`Rejection::Invalid`] naming the field.
pub fn normalize_author_name(value: &str) -> Result<String, Rejection> {
    check_text("author_name", value, AUTHOR_NAME_CHARS_MAX)
}

/// Keeps content as sent; checks 1..=100 000 bytes and not only whitespace.
///
/// # Errors
/// [`Rejection::Invalid`] naming the field.
pub fn normalize_content(value: &str) -> Result<String, Rejection> {
    Ok(crate::text::body("content", value, CONTENT_BYTES_MAX)?)
}

/// Decides which events a command produces on a state.
///
/// # Errors
/// [`Rejection`] when the command is not allowed on this state or a field is
/// out of bounds.
pub fn decide(state: &PostState, command: &Command) -> Result<Vec<Event>, Rejection> {
    match (state, command) {
        (
            PostState::Absent,
            Command::Create {
                title,
                content,
                author_name,
            },
        ) => Ok(vec![Event::Created {
            title: normalize_title(title)?,
            content: normalize_content(content)?,
            author_name: normalize_author_name(author_name)?,
        }]),
        (PostState::Live(_) | PostState::Deleted(_), Command::Create { .. }) => {
            Err(Rejection::AlreadyExists)
        }
        (PostState::Absent, Command::Update { .. } | Command::Delete) => Err(Rejection::NotFound),
        (PostState::Deleted(_), Command::Update { .. } | Command::Delete) => {
            Err(Rejection::Deleted)
        }
        (
            PostState::Live(post),
            Command::Update {
                title,
                content,
                author_name,
            },
        ) => {
            if title.is_none() && content.is_none() && author_name.is_none() {
                return Err(Rejection::EmptyUpdate);
            }
            let title = title.as_deref().map(normalize_title).transpose()?;
            let content = content.as_deref().map(normalize_content).transpose()?;
            let author_name = author_name
                .as_deref()
                .map(normalize_author_name)
                .transpose()?;
            // An update that changes nothing appends nothing (and answers
            // the current version); otherwise the event carries every field
            // given, as the command said it.
            let same = |new: &Option<String>, old: &str| new.as_deref().is_none_or(|v| v == old);
            if same(&title, &post.title)
                && same(&content, &post.content)
                && same(&author_name, &post.author_name)
            {
                return Ok(Vec::new());
            }
            Ok(vec![Event::Updated {
                title,
                content,
                author_name,
            }])
        }
        (PostState::Live(_), Command::Delete) => Ok(vec![Event::Deleted]),
    }
}

fn state_name(state: &PostState) -> &'static str {
    match state {
        PostState::Absent => "absent",
        PostState::Live(_) => "live",
        PostState::Deleted(_) => "deleted",
    }
}

/// Folds one event into the state. Creation is the explicit `Absent` case.
///
/// # Errors
/// [`InvariantViolation`] when the event cannot follow the state (an update
/// before a create, anything after a delete, a second create).
pub fn apply(state: PostState, event: &Event) -> Result<PostState, InvariantViolation> {
    match (state, event) {
        (
            PostState::Absent,
            Event::Created {
                title,
                content,
                author_name,
            },
        ) => Ok(PostState::Live(Post {
            title: title.clone(),
            content: content.clone(),
            author_name: author_name.clone(),
        })),
        (
            PostState::Live(mut post),
            Event::Updated {
                title,
                content,
                author_name,
            },
        ) => {
            if let Some(t) = title {
                post.title.clone_from(t);
            }
            if let Some(c) = content {
                post.content.clone_from(c);
            }
            if let Some(a) = author_name {
                post.author_name.clone_from(a);
            }
            Ok(PostState::Live(post))
        }
        (PostState::Live(post), Event::Deleted) => Ok(PostState::Deleted(post)),
        (state, event) => Err(InvariantViolation {
            event: event.name(),
            state: state_name(&state),
        }),
    }
}

impl Event {
    /// The stable event type name carried in the `Event-Type` header.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Event::Created { .. } => "PostCreated",
            Event::Updated { .. } => "PostUpdated",
            Event::Deleted => "PostDeleted",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(events: &[Event]) -> PostState {
        events
            .iter()
            .try_fold(PostState::Absent, apply)
            .expect("given events must fold")
    }

    fn created() -> Event {
        Event::Created {
            title: "Hello".into(),
            content: "World".into(),
            author_name: "ann".into(),
        }
    }

    fn update(title: Option<&str>, content: Option<&str>, author: Option<&str>) -> Command {
        Command::Update {
            title: title.map(Into::into),
            content: content.map(Into::into),
            author_name: author.map(Into::into),
        }
    }

    #[test]
    fn given_a_post_when_update_with_its_own_values_then_nothing() {
        let given = PostState::Live(Post {
            title: "Hello".into(),
            content: "World".into(),
            author_name: "ann".into(),
        });
        assert_eq!(
            decide(&given, &update(Some(" Hello "), None, Some("ann"))),
            Ok(vec![])
        );
        assert_eq!(
            decide(&given, &update(Some("Hello"), Some("Earth"), None)),
            Ok(vec![Event::Updated {
                title: Some("Hello".into()),
                content: Some("Earth".into()),
                author_name: None,
            }])
        );
    }

    #[test]
    fn given_nothing_when_create_then_created_with_trimmed_fields() {
        let when = Command::Create {
            title: "  Hello ".into(),
            content: " World\n".into(),
            author_name: " ann ".into(),
        };
        assert_eq!(
            decide(&given(&[]), &when),
            Ok(vec![Event::Created {
                title: "Hello".into(),
                content: " World\n".into(),
                author_name: "ann".into(),
            }])
        );
    }

    #[test]
    fn given_created_when_create_then_already_exists() {
        let when = Command::Create {
            title: "a".into(),
            content: "b".into(),
            author_name: "c".into(),
        };
        assert_eq!(
            decide(&given(&[created()]), &when),
            Err(Rejection::AlreadyExists)
        );
    }

    #[test]
    fn given_nothing_when_update_or_delete_then_not_found() {
        assert_eq!(
            decide(&given(&[]), &update(Some("x"), None, None)),
            Err(Rejection::NotFound)
        );
        assert_eq!(
            decide(&given(&[]), &Command::Delete),
            Err(Rejection::NotFound)
        );
    }

    #[test]
    fn given_created_when_update_title_then_only_title_changes() {
        let then = decide(&given(&[created()]), &update(Some("New"), None, None)).unwrap();
        assert_eq!(
            then,
            vec![Event::Updated {
                title: Some("New".into()),
                content: None,
                author_name: None
            }]
        );
        let state = given(&[created(), then[0].clone()]);
        assert_eq!(
            state,
            PostState::Live(Post {
                title: "New".into(),
                content: "World".into(),
                author_name: "ann".into()
            })
        );
    }

    #[test]
    fn given_created_when_empty_update_then_rejected() {
        assert_eq!(
            decide(&given(&[created()]), &update(None, None, None)),
            Err(Rejection::EmptyUpdate)
        );
    }

    #[test]
    fn given_created_when_delete_then_deleted_and_history_kept() {
        assert_eq!(
            decide(&given(&[created()]), &Command::Delete),
            Ok(vec![Event::Deleted])
        );
        assert!(
            matches!(given(&[created(), Event::Deleted]), PostState::Deleted(p) if p.title == "Hello")
        );
    }

    #[test]
    fn given_deleted_when_update_or_delete_then_deleted() {
        let state = given(&[created(), Event::Deleted]);
        assert_eq!(
            decide(&state, &update(Some("x"), None, None)),
            Err(Rejection::Deleted)
        );
        assert_eq!(decide(&state, &Command::Delete), Err(Rejection::Deleted));
    }

    /// Finding 10: format characters made look-alike authors.
    #[test]
    fn given_nothing_when_create_with_format_characters_then_invalid() {
        for (title, author) in [
            ("t", "an\u{200B}n"),
            ("t", "\u{202E}nna"),
            ("a\u{2066}b", "ann"),
            ("soft\u{00AD}hyphen", "ann"),
            ("t", "ann\u{FEFF}"),
        ] {
            let r = decide(
                &given(&[]),
                &Command::Create {
                    title: title.into(),
                    content: "c\u{200B} is fine in content".into(),
                    author_name: author.into(),
                },
            );
            match r {
                Err(Rejection::Invalid { reason, .. }) => {
                    assert!(reason.contains("format characters"), "{reason}");
                }
                other => panic!("{title:?} by {author:?}: {other:?}"),
            }
        }
        // Scripts that need joiners in ordinary text still pass elsewhere:
        // accents, CJK, emoji without joiners.
        assert!(
            decide(
                &given(&[]),
                &Command::Create {
                    title: "Café 東京 🚀".into(),
                    content: "c".into(),
                    author_name: "Zoë".into(),
                },
            )
            .is_ok()
        );
    }

    #[test]
    fn given_nothing_when_create_with_bad_fields_then_invalid_names_field() {
        let long_title = "t".repeat(TITLE_CHARS_MAX + 1);
        let cases = [
            (
                "title",
                Command::Create {
                    title: "   ".into(),
                    content: "c".into(),
                    author_name: "a".into(),
                },
            ),
            (
                "title",
                Command::Create {
                    title: long_title,
                    content: "c".into(),
                    author_name: "a".into(),
                },
            ),
            (
                "author_name",
                Command::Create {
                    title: "t".into(),
                    content: "c".into(),
                    author_name: "a".repeat(101),
                },
            ),
            (
                "content",
                Command::Create {
                    title: "t".into(),
                    content: "\n\t ".into(),
                    author_name: "a".into(),
                },
            ),
            (
                "content",
                Command::Create {
                    title: "t".into(),
                    content: "x".repeat(CONTENT_BYTES_MAX + 1),
                    author_name: "a".into(),
                },
            ),
            (
                "title",
                Command::Create {
                    title: "a\u{7}b".into(),
                    content: "c".into(),
                    author_name: "a".into(),
                },
            ),
        ];
        for (field, when) in cases {
            match decide(&PostState::Absent, &when) {
                Err(Rejection::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("expected invalid {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn bounds_are_inclusive() {
        let when = Command::Create {
            title: "é".repeat(TITLE_CHARS_MAX),
            content: "x".repeat(CONTENT_BYTES_MAX),
            author_name: "a".repeat(AUTHOR_NAME_CHARS_MAX),
        };
        assert!(decide(&PostState::Absent, &when).is_ok());
    }

    #[test]
    fn update_before_create_violates_invariant() {
        let err = apply(
            PostState::Absent,
            &Event::Updated {
                title: None,
                content: None,
                author_name: None,
            },
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "PostUpdated cannot follow a post that is absent"
        );
        assert!(apply(given(&[created(), Event::Deleted]), &Event::Deleted).is_err());
        assert!(apply(given(&[created()]), &created()).is_err());
    }
}
