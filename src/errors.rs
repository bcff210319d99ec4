//! Errors as operators need to read them: with their causes. tokio-postgres says "db
//! error" or "error connecting to server" and keeps the reason (the server's message,
//! the refused certificate) in its source.

use std::fmt;

/// Displays an error followed by each of its causes not already in the text.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let cause_text = match cause.downcast_ref::<tokio_postgres::error::DbError>() {
                Some(db) => format!("{} ({})", db.message(), db.code().code()),
                None => cause.to_string(),
            };
            if !text.contains(&cause_text) {
                text.push_str(": ");
                text.push_str(&cause_text);
            }
            source = cause.source();
        }
        f.write_str(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner;

    #[test]
    fn causes_follow_the_error() {
        assert_eq!(Chain(&Outer(Inner)).to_string(), "outer: inner");
    }
}
