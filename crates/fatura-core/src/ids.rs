//! Identifiers that are valid by construction.

use std::fmt;

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty identifier.
    #[error("must not be empty")]
    Empty,
    /// Longer than allowed.
    #[error("must be at most {0} characters")]
    TooLong(usize),
    /// Contains a character outside the allowed set.
    #[error("may contain only letters, digits and - _ . : / @ (found {0:?})")]
    BadChar(char),
}

fn check(s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.chars().count() > max {
        return Err(IdError::TooLong(max));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@')))
    {
        return Err(IdError::BadChar(c));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Longest accepted identifier, in characters.
            pub const MAX_LEN: usize = $max;

            /// Parses an identifier: 1 to `MAX_LEN` characters of `[A-Za-z0-9-_.:/@]`.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check(s, $max)?;
                Ok($name(s.to_string()))
            }

            /// The identifier as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A usage event id: the idempotency key, unique for all time.
    EventId,
    128
);
id_type!(
    /// A customer id, chosen by the operator or generated (`cus_…`).
    CustomerId,
    64
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_bounded_and_printable() {
        assert!(EventId::parse("evt_01H:abc/1@x").is_ok());
        assert_eq!(EventId::parse(""), Err(IdError::Empty));
        assert_eq!(EventId::parse(&"a".repeat(129)), Err(IdError::TooLong(128)));
        assert!(EventId::parse(&"a".repeat(128)).is_ok());
        assert_eq!(EventId::parse("a b"), Err(IdError::BadChar(' ')));
        assert_eq!(EventId::parse("a\u{0}"), Err(IdError::BadChar('\u{0}')));
    }
}
