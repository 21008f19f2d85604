//! Hostile bytes on a control socket: a request line, a reply line a
//! client reads, or a value typed on a command line. Parsing and checking
//! must refuse or accept, never panic; an accepted request survives its
//! own serialisation.
#![no_main]

use ferry_control::protocol::{parse_request, Greeting, Reply, Request};
use ferry_control::units::{
    parse_bytes, parse_duration, parse_rate, BareUnit, MAX_DEADLINE, MAX_DOWNTIME,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        match &req {
            Request::Migrate(m) => {
                let _ = m.options();
            }
            Request::Set(limits) => {
                let _ = limits.validate();
            }
            _ => {}
        }
        let line = serde_json::to_vec(&req).expect("a parsed request serialises");
        assert!(parse_request(&line).is_ok(), "a serialised request parses");
    }
    let _ = serde_json::from_slice::<Reply>(data);
    let _ = serde_json::from_slice::<Greeting>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_bytes(s);
        let _ = parse_rate(s);
        let _ = parse_duration(s, BareUnit::Secs, MAX_DEADLINE);
        let _ = parse_duration(s, BareUnit::Millis, MAX_DOWNTIME);
    }
});
