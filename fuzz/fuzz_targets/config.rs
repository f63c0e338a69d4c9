//! The daemon's TOML configuration parser on arbitrary text: a clear error
//! or a configuration, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = tern_net::config::ServerConfig::from_toml(text, std::path::Path::new("/nonexistent-base"));
    // (parse_listen is left out here: it resolves host names, which makes
    // a run crawl; from_toml above still reaches it for `listen`.)
    for line in text.lines() {
        let _ = tern_net::config::PullPeer::parse(line);
    }
});
