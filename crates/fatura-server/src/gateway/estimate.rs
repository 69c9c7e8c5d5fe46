//! Token estimation with a real tokenizer (`tiktoken-rs`, `o200k_base`), used only when an
//! upstream reported no usage; such events are marked `estimated`.

use std::sync::OnceLock;

use serde_json::{Map, Value};
use tiktoken_rs::CoreBPE;

fn bpe() -> Option<&'static CoreBPE> {
    static BPE: OnceLock<Option<CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| match tiktoken_rs::o200k_base() {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(error = %e, "cannot load the tokenizer");
            None
        }
    })
    .as_ref()
}

/// Tokens of a text.
pub fn count_text(text: &str) -> u64 {
    match bpe() {
        Some(b) => b.encode_ordinary(text).len() as u64,
        // Without the tokenizer: OpenAI's rule of thumb, 4 characters per token.
        None => (text.chars().count() as u64).div_ceil(4),
    }
}

/// Prompt tokens of a chat request: message contents plus OpenAI's per-message overhead
/// (3 tokens per message, 3 to prime the reply).
pub fn count_chat_prompt(request: &Map<String, Value>) -> u64 {
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return 0;
    };
    let mut total = 3;
    for m in messages {
        total += 3;
        match &m["content"] {
            Value::String(s) => total += count_text(s),
            Value::Array(parts) => {
                for p in parts {
                    if let Some(t) = p["text"].as_str() {
                        total += count_text(t);
                    }
                }
            }
            _ => {}
        }
        if let Some(name) = m["name"].as_str() {
            total += count_text(name) + 1;
        }
    }
    total
}

/// Input tokens of an embeddings request.
pub fn count_embedding_input(request: &Map<String, Value>) -> u64 {
    match request.get("input") {
        Some(Value::String(s)) => count_text(s),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(count_text).sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_with_the_real_tokenizer() {
        assert_eq!(count_text("hello world"), 2);
        let request = json!({"messages": [{"role": "user", "content": "hello world"}]});
        let Value::Object(request) = request else {
            unreachable!("an object")
        };
        assert_eq!(count_chat_prompt(&request), 8);
    }
}
