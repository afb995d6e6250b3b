//! Consistency tokens across streams: what a read's `min_seq` asks for.
//!
//! A command answers with a sequence of its own context's stream. A read
//! names it as a bare number, meaning the stream of the route's own
//! projection, or as `STREAM:n[,STREAM:n...]`. On a route whose projection
//! follows several streams a bare number names no stream, and a stream the
//! route does not follow is refused too.

/// Most streams one `min_seq` may name.
const STREAMS_MAX: usize = 8;

/// The sequences `raw` asks for, one per stream of `follows` it names.
///
/// # Errors
/// A message for the client (a 400) naming what is wrong.
pub fn parse_min_seq(raw: &str, follows: &[&str]) -> Result<Vec<(String, u64)>, String> {
    let raw = raw.trim();
    if let Ok(n) = raw.parse::<u64>() {
        return match follows {
            [one] => Ok(vec![((*one).to_string(), n)]),
            _ => Err(format!(
                "min_seq {raw:?} names no stream; this read follows {}: use STREAM:n, e.g. {}:{n}",
                follows.join(" and "),
                follows.first().copied().unwrap_or("POSTS"),
            )),
        };
    }
    let mut wanted: Vec<(String, u64)> = Vec::new();
    for (i, part) in raw.split(',').enumerate() {
        if i >= STREAMS_MAX {
            return Err(format!("min_seq names more than {STREAMS_MAX} streams"));
        }
        let shown: String = part.chars().take(40).collect();
        let (stream, seq) = part.trim().split_once(':').ok_or_else(|| {
            format!(
                "min_seq must be a stream sequence (u64) or STREAM:n[,STREAM:n...], got {shown:?}"
            )
        })?;
        let seq: u64 = seq
            .trim()
            .parse()
            .map_err(|_| format!("min_seq {shown:?}: the sequence must be a u64"))?;
        let stream = stream.trim();
        if !follows.contains(&stream) {
            return Err(format!(
                "min_seq names stream {stream:?}, which this read does not follow (it follows {})",
                follows.join(", ")
            ));
        }
        match wanted.iter_mut().find(|(s, _)| s == stream) {
            Some((_, n)) => *n = (*n).max(seq),
            None => wanted.push((stream.to_string(), seq)),
        }
    }
    Ok(wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_numbers_name_the_only_stream_and_lists_name_theirs() {
        assert_eq!(
            parse_min_seq("7", &["POSTS"]),
            Ok(vec![("POSTS".into(), 7)])
        );
        assert_eq!(
            parse_min_seq("POSTS:3, COMMENTS:4,POSTS:9", &["POSTS", "COMMENTS"]),
            Ok(vec![("POSTS".into(), 9), ("COMMENTS".into(), 4)])
        );
        assert!(parse_min_seq("7", &["POSTS", "COMMENTS"]).is_err());
        assert!(parse_min_seq("COMMENTS:1", &["POSTS"]).is_err());
        for bad in ["", "x", "POSTS:", "POSTS:-1", ":3", "POSTS:1,", "-3"] {
            assert!(parse_min_seq(bad, &["POSTS"]).is_err(), "{bad:?}");
        }
        let many = ["POSTS:1"; 9].join(",");
        assert!(parse_min_seq(&many, &["POSTS"]).is_err());
    }
}
