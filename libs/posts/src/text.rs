//! The text rules every context's fields share: a one-line name or title
//! is trimmed and bounded in characters, with no control or invisible
//! format characters; a body is kept as sent, bounded in bytes, and must not
//! be only whitespace.

/// A field out of bounds: which one and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct FieldError {
    pub field: &'static str,
    pub reason: String,
}

/// Trims surrounding whitespace and checks 1..=`max_chars` characters, no
/// control or format characters.
///
/// # Errors
/// [`FieldError`] naming the field.
pub fn line(field: &'static str, value: &str, max_chars: usize) -> Result<String, FieldError> {
    let trimmed = value.trim();
    let n_chars = trimmed.chars().count();
    if n_chars == 0 {
        return Err(FieldError {
            field,
            reason: "must not be empty or only whitespace".into(),
        });
    }
    if n_chars > max_chars {
        return Err(FieldError {
            field,
            reason: format!("must be at most {max_chars} characters, got {n_chars}"),
        });
    }
    if trimmed.chars().any(char::is_control) {
        return Err(FieldError {
            field,
            reason: "must not contain control characters".into(),
        });
    }
    if let Some(c) = trimmed.chars().find(|c| is_format_char(*c)) {
        return Err(FieldError {
            field,
            reason: format!(
                "must not contain invisible format characters (found U+{:04X}): they make look-alike names",
                u32::from(c)
            ),
        });
    }
    Ok(trimmed.to_string())
}

/// Unicode's format characters (general category Cf): invisible, they
/// reorder text (U+202E) or hide in it (U+200B), so "ann" and "an\u{200B}n"
/// would show alike. The ranges of Unicode 16's Cf.
fn is_format_char(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x202A..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
}

/// Keeps a body as sent; checks 1..=`max_bytes` bytes, not only whitespace,
/// no NUL.
///
/// # Errors
/// [`FieldError`] naming the field.
pub fn body(field: &'static str, value: &str, max_bytes: usize) -> Result<String, FieldError> {
    if value.trim().is_empty() {
        return Err(FieldError {
            field,
            reason: "must not be empty or only whitespace".into(),
        });
    }
    if value.len() > max_bytes {
        return Err(FieldError {
            field,
            reason: format!("must be at most {max_bytes} bytes, got {}", value.len()),
        });
    }
    if value.contains('\0') {
        return Err(FieldError {
            field,
            reason: "must not contain NUL characters".into(),
        });
    }
    Ok(value.to_string())
}
