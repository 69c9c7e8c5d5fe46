//! Price catalog files (OpenRouter's /api/v1/models, LiteLLM's price map): any bytes.
//! Never panics; errors are values.
#![no_main]

use fatura_core::import::{CatalogFormat, parse_catalog};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_catalog(CatalogFormat::OpenRouter, data, None);
    let _ = parse_catalog(CatalogFormat::LiteLlm, data, Some("openai"));
});
