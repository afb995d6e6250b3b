//! The `text` field's tokenizer: tantivy's `default` analyzer (split on
//! every non-alphanumeric character, drop tokens of 40 bytes or more,
//! lowercase) plus ASCII folding (`Café` and `cafe` are one term, `résumé`
//! and `resume` too), with a fast path for ASCII text, which folding leaves
//! as it is. The generic chain decodes
//! each character, asks Unicode whether it is alphanumeric and passes each
//! token through two boxed filters: 4-5% of a catch-up's CPU in `just
//! bench`. On ASCII text one byte scan gives exactly the same tokens,
//! offsets and positions; any other text goes through the generic chain.

use tantivy::tokenizer::{
    AsciiFoldingFilter, BoxTokenStream, LowerCaser, RemoveLongFilter, SimpleTokenizer,
    TextAnalyzer, Token, TokenStream, Tokenizer,
};

/// Tokens of this many bytes or more are dropped (tantivy's default).
pub(crate) const TOKEN_BYTES_LIMIT: usize = 40;

/// The analyzer the index registers as `default`.
#[derive(Clone)]
pub struct PostTokenizer {
    token: Token,
    generic: TextAnalyzer,
}

impl Default for PostTokenizer {
    fn default() -> Self {
        Self {
            token: Token::default(),
            generic: generic(),
        }
    }
}

/// tantivy's own `default` analyzer.
fn generic() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(TOKEN_BYTES_LIMIT))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter)
        .build()
}

pub enum PostTokenStream<'a> {
    Ascii(AsciiTokenStream<'a>),
    Generic(BoxTokenStream<'a>),
}

pub struct AsciiTokenStream<'a> {
    bytes: &'a [u8],
    at: usize,
    token: &'a mut Token,
}

impl Tokenizer for PostTokenizer {
    type TokenStream<'a> = PostTokenStream<'a>;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> PostTokenStream<'a> {
        if text.is_ascii() {
            self.token.reset();
            PostTokenStream::Ascii(AsciiTokenStream {
                bytes: text.as_bytes(),
                at: 0,
                token: &mut self.token,
            })
        } else {
            PostTokenStream::Generic(self.generic.token_stream(text))
        }
    }
}

/// A run of alphanumerics in ASCII text, as the generic chain cuts it.
pub(crate) enum AsciiWord {
    /// A token: its byte range.
    Word(std::ops::Range<usize>),
    /// [`TOKEN_BYTES_LIMIT`] bytes or more: dropped, but like any token it
    /// takes a position.
    TooLong,
}

/// The next word of ASCII text from byte `*at` on; `None` at the end.
pub(crate) fn next_ascii_word(bytes: &[u8], at: &mut usize) -> Option<AsciiWord> {
    let Some(start) = bytes[*at..]
        .iter()
        .position(u8::is_ascii_alphanumeric)
        .map(|i| *at + i)
    else {
        *at = bytes.len();
        return None;
    };
    let end = bytes[start..]
        .iter()
        .position(|b| !b.is_ascii_alphanumeric())
        .map_or(bytes.len(), |i| start + i);
    *at = end;
    Some(if end - start >= TOKEN_BYTES_LIMIT {
        AsciiWord::TooLong
    } else {
        AsciiWord::Word(start..end)
    })
}

impl TokenStream for AsciiTokenStream<'_> {
    fn advance(&mut self) -> bool {
        loop {
            // Like the generic chain: every token found takes a position,
            // the ones dropped for length too.
            self.token.text.clear();
            self.token.position = self.token.position.wrapping_add(1);
            match next_ascii_word(self.bytes, &mut self.at) {
                None => return false,
                Some(AsciiWord::TooLong) => {}
                Some(AsciiWord::Word(word)) => {
                    self.token.offset_from = word.start;
                    self.token.offset_to = word.end;
                    self.token.text.extend(
                        self.bytes[word]
                            .iter()
                            .map(|b| char::from(b.to_ascii_lowercase())),
                    );
                    return true;
                }
            }
        }
    }

    fn token(&self) -> &Token {
        self.token
    }

    fn token_mut(&mut self) -> &mut Token {
        self.token
    }
}

impl TokenStream for PostTokenStream<'_> {
    fn advance(&mut self) -> bool {
        match self {
            Self::Ascii(s) => s.advance(),
            Self::Generic(s) => s.advance(),
        }
    }

    fn token(&self) -> &Token {
        match self {
            Self::Ascii(s) => s.token(),
            Self::Generic(s) => s.token(),
        }
    }

    fn token_mut(&mut self) -> &mut Token {
        match self {
            Self::Ascii(s) => s.token_mut(),
            Self::Generic(s) => s.token_mut(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(stream: &mut dyn TokenStream) -> Vec<Token> {
        let mut out = Vec::new();
        while stream.advance() {
            out.push(stream.token().clone());
        }
        out
    }

    /// Exactly tantivy's `default` analyzer: texts, offsets and positions,
    /// on ASCII (the fast path) and on other text (the generic chain).
    #[test]
    fn matches_tantivys_default_analyzer() {
        let long = "x".repeat(TOKEN_BYTES_LIMIT);
        let just_short = "y".repeat(TOKEN_BYTES_LIMIT - 1);
        let texts = [
            String::new(),
            "   ".to_string(),
            "Hello, happy TAX payer!".to_string(),
            "JetStream2 v0.51 -- a_b c-d e.f".to_string(),
            format!("before {long} {just_short} after"),
            long.clone(),
            "tabs\tand\nnewlines\r\nand (brackets) [x] {y} 42".to_string(),
            "Ünïcode Straße naïve 東京 café".to_string(),
            "mixed ASCII then é and more".to_string(),
        ];
        let mut ours = PostTokenizer::default();
        let mut theirs = generic();
        // Pseudo-random ASCII, punctuation and long runs included.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let alphabet = b"abcXYZ019 .,-_'\t!?";
        let mut random = Vec::new();
        for _ in 0..200 {
            let mut s = String::new();
            for _ in 0..120 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                let i = usize::try_from(state >> 59).unwrap_or(0) % alphabet.len();
                s.push(char::from(alphabet[i]));
                if state.is_multiple_of(97) {
                    s.push_str(&long);
                }
            }
            random.push(s);
        }
        for text in texts.iter().chain(&random) {
            let a = collect(&mut ours.token_stream(text));
            let b = collect(&mut theirs.token_stream(text));
            assert_eq!(a.len(), b.len(), "{text:?}");
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(
                    (
                        &x.text,
                        x.offset_from,
                        x.offset_to,
                        x.position,
                        x.position_length
                    ),
                    (
                        &y.text,
                        y.offset_from,
                        y.offset_to,
                        y.position,
                        y.position_length
                    ),
                    "{text:?}"
                );
            }
        }
    }
}
