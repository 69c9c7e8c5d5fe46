//! Column types whose storage differs between the databases, so that the shared queries
//! ([`crate::sqlite`] and [`crate::postgres`] both compile `shared.rs`) bind and read them
//! the same way.
//!
//! - [`Dec`]: money and rates. SQLite stores the exact decimal text (TEXT, read back with a
//!   strict parser); PostgreSQL stores NUMERIC.
//! - [`JsonText`]: an event's tags, bound as JSON text. SQLite stores TEXT; PostgreSQL
//!   stores JSONB. Read back with `CAST(tags AS TEXT)`, which both understand.

use std::borrow::Cow;
use std::str::FromStr;

use rust_decimal::Decimal;
use sqlx::decode::Decode;
use sqlx::encode::{Encode, IsNull};
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef, Postgres};
use sqlx::sqlite::{Sqlite, SqliteArgumentValue, SqliteTypeInfo, SqliteValueRef};
use sqlx::types::Type;

/// A decimal as the database keeps it: TEXT in SQLite, NUMERIC in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dec(pub Decimal);

/// Parses the decimal text SQLite keeps: an optional `-`, digits, and at most one `.` with
/// digits after it — exactly what `Decimal::to_string` writes. Anything else (exponents,
/// `_` separators, spaces, a `+`) is corrupt data, not a number to guess at.
pub(crate) fn parse_strict(s: &str) -> Result<Decimal, String> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (digits, None),
    };
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(int) || frac.is_some_and(|f| !all_digits(f)) {
        return Err(format!("bad decimal {s:?} in database"));
    }
    Decimal::from_str(s).map_err(|e| format!("bad decimal {s:?} in database: {e}"))
}

impl Type<Sqlite> for Dec {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }

    fn compatible(ty: &SqliteTypeInfo) -> bool {
        <String as Type<Sqlite>>::compatible(ty)
    }
}

impl<'q> Encode<'q, Sqlite> for Dec {
    fn encode_by_ref(
        &self,
        args: &mut Vec<SqliteArgumentValue<'q>>,
    ) -> Result<IsNull, BoxDynError> {
        args.push(SqliteArgumentValue::Text(Cow::Owned(self.0.to_string())));
        Ok(IsNull::No)
    }
}

impl<'r> Decode<'r, Sqlite> for Dec {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        let s = <&str as Decode<Sqlite>>::decode(value)?;
        Ok(Dec(parse_strict(s)?))
    }
}

impl Type<Postgres> for Dec {
    fn type_info() -> PgTypeInfo {
        <Decimal as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <Decimal as Type<Postgres>>::compatible(ty)
    }
}

impl Encode<'_, Postgres> for Dec {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        <Decimal as Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for Dec {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(Dec(<Decimal as Decode<Postgres>>::decode(value)?))
    }
}

/// JSON text to store in a JSON column: TEXT in SQLite, JSONB in PostgreSQL (encode only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsonText(pub String);

/// PostgreSQL's `jsonb` type.
const JSONB_OID: Oid = Oid(3802);

impl Type<Sqlite> for JsonText {
    fn type_info() -> SqliteTypeInfo {
        <String as Type<Sqlite>>::type_info()
    }
}

impl<'q> Encode<'q, Sqlite> for JsonText {
    fn encode_by_ref(
        &self,
        args: &mut Vec<SqliteArgumentValue<'q>>,
    ) -> Result<IsNull, BoxDynError> {
        args.push(SqliteArgumentValue::Text(Cow::Owned(self.0.clone())));
        Ok(IsNull::No)
    }
}

impl Type<Postgres> for JsonText {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSONB_OID)
    }
}

impl Encode<'_, Postgres> for JsonText {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        // The binary format of jsonb: a version byte (1), then the JSON text.
        buf.push(1);
        buf.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::panic)]

    use super::parse_strict;
    use rust_decimal::Decimal;
    use std::str::FromStr;

    #[test]
    fn strict_parse_takes_exactly_what_to_string_writes() {
        for s in [
            "0",
            "0.00",
            "-1.5",
            "12.340",
            "0.000000000000000001",
            "79228162514264337593543950335",
        ] {
            let d = parse_strict(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(d.to_string(), s);
        }
        let d = Decimal::from_str("-0.25").unwrap_or_default();
        assert_eq!(parse_strict(&d.to_string()), Ok(d));
        for bad in [
            "", "-", ".5", "5.", "1e5", "1_000", " 1", "1 ", "+1", "1.2.3", "NaN", "0x10", "--1",
        ] {
            assert!(parse_strict(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
