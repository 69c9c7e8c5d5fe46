//! The gateway section of the configuration file: any text, as TOML, then validated.
//! Never panics.
#![no_main]

use fatura_server::gateway::GatewayConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = toml::from_str::<GatewayConfig>(text) {
        let _ = config.validate();
        for route in &config.routes {
            for m in &route.models {
                let _ = config.chain_for(m);
            }
        }
    }
});
