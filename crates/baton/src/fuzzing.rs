//! Entry points for the fuzz targets in `fuzz/` (run with `cargo fuzz`,
//! see docs/SECURITY.md), and the replay of their corpus as unit tests.
//!
//! Each function takes arbitrary bytes, decodes them as a peer's message
//! would be decoded, and panics if a property does not hold: a decoded
//! message encodes back to something that decodes to the same message.
#![allow(clippy::panic)]

use crate::control::Request;
use crate::handoff::Message;

/// One control-socket request line.
pub fn control(data: &[u8]) {
    let Ok(req) = serde_json::from_slice::<Request>(data) else {
        return;
    };
    let again = serde_json::to_vec(&req)
        .ok()
        .and_then(|v| serde_json::from_slice::<Request>(&v).ok());
    if again.as_ref() != Some(&req) {
        panic!("{req:?} does not survive a round trip: {again:?}");
    }
}

/// One hand-off handshake line.
pub fn handshake(data: &[u8]) {
    let Ok(msg) = serde_json::from_slice::<Message>(data) else {
        return;
    };
    let line = msg.line();
    match serde_json::from_slice::<Message>(&line) {
        Ok(again) if again.line() == line => {}
        other => panic!("{msg:?} does not survive a round trip: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_testkit::replay_corpus as replay;

    #[test]
    fn corpus_control() {
        replay("control", control);
    }

    #[test]
    fn corpus_handshake() {
        replay("handshake", handshake);
    }
}
