//! Architecture Invariant: one SQL text per statement. A statement both databases run is
//! written once, in `src/shared.rs`; `src/sqlite.rs` and `src/postgres.rs` hold only what
//! differs. This test reads the sources and fails if a string literal holding a statement
//! (SELECT, INSERT, UPDATE, DELETE) appears in both per-database files, placeholders
//! (`?`, `?1`, `$1`) and whitespace aside.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;

/// The string literals of a Rust source (plain `"…"` literals, with `\` line continuations
/// joined; raw strings are not used for SQL here), in order.
fn string_literals(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = src.chars().peekable();
    let mut in_line_comment = false;
    let mut prev = '\0';
    while let Some(c) = chars.next() {
        if in_line_comment {
            if c == '\n' {
                in_line_comment = false;
            }
            prev = c;
            continue;
        }
        if c == '/' && chars.peek() == Some(&'/') {
            in_line_comment = true;
            continue;
        }
        // A char literal '"' is not the start of a string.
        if c == '"' && prev != '\'' {
            let mut s = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('\n') => {
                            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                                chars.next();
                            }
                        }
                        Some('n') => s.push('\n'),
                        Some(other) => s.push(other),
                        None => {}
                    },
                    other => s.push(other),
                }
            }
            out.push(s);
            prev = '"';
            continue;
        }
        prev = c;
    }
    out
}

/// A statement's text with placeholders as `?` and whitespace collapsed.
fn normalized(sql: &str) -> String {
    let mut out = String::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '?' | '$' if c == '?' || chars.peek().is_some_and(char::is_ascii_digit) => {
                while chars.peek().is_some_and(char::is_ascii_digit) {
                    chars.next();
                }
                out.push('?');
            }
            c if c.is_whitespace() => {
                if !out.ends_with(' ') {
                    out.push(' ');
                }
            }
            c => out.push(c),
        }
    }
    out.trim().to_string()
}

fn is_statement(s: &str) -> bool {
    let upper = s.to_ascii_uppercase();
    ["SELECT ", "INSERT ", "UPDATE ", "DELETE "]
        .iter()
        .any(|kw| upper.contains(kw))
}

fn statements(file: &str) -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(file);
    let src = std::fs::read_to_string(&path).unwrap();
    string_literals(&src)
        .iter()
        .filter(|s| is_statement(s))
        .map(|s| normalized(s))
        .collect()
}

#[test]
fn no_statement_is_written_in_both_database_files() {
    let sqlite = statements("sqlite.rs");
    let postgres = statements("postgres.rs");
    let both: Vec<&String> = sqlite.intersection(&postgres).collect();
    assert!(
        both.is_empty(),
        "{} statement(s) written in both sqlite.rs and postgres.rs; move them to shared.rs:\n{}",
        both.len(),
        both.iter()
            .map(|s| format!("  {s}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // What each file keeps is what differs; the statements are in shared.rs.
    println!(
        "statements: shared.rs {}, sqlite.rs {}, postgres.rs {}, in both per-database files {}",
        statements("shared.rs").len(),
        sqlite.len(),
        postgres.len(),
        both.len()
    );
}

#[test]
fn the_check_sees_statements_and_ignores_placeholder_style() {
    let src = r#"
        // "SELECT in a comment" is not a literal
        let c = '"';
        sqlx::query("SELECT * FROM invoices WHERE id = ?1 AND status = ?")
        sqlx::query("SELECT * FROM invoices \
                     WHERE id = $1 AND status = $2")
    "#;
    let found: Vec<String> = string_literals(src)
        .iter()
        .filter(|s| is_statement(s))
        .map(|s| normalized(s))
        .collect();
    assert_eq!(
        found,
        [
            "SELECT * FROM invoices WHERE id = ? AND status = ?",
            "SELECT * FROM invoices WHERE id = ? AND status = ?"
        ]
    );
    assert!(
        statements("shared.rs").len() > 60,
        "the shared statements are found"
    );
}
