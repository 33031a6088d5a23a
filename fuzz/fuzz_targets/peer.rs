//! Peer links: whatever bytes arrive on a peer connection, the frame decoder
//! and what it hands on (raft-rs message decoding, forwarded command lists,
//! batches) must never panic, never claim more bytes than it was given, and
//! respect the hello-size limit before a hello has been accepted.
//!
//! Input: the byte stream, decoded as a peer link decodes it (first under
//! the hello limit, then the frame limit), and also read as a command list
//! and as a log entry's batch.

#![no_main]

use dflockd::cluster::command::{Commands, decode_batch};
use dflockd::cluster::wire::{self, Frame, MAX_FRAME, MAX_HELLO};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    let mut hello_done = false;
    while at < data.len() {
        let max = if hello_done { MAX_FRAME } else { MAX_HELLO };
        match wire::decode(&data[at..], max) {
            Ok(Some((frame, n))) => {
                assert!(n >= 5 && n <= data.len() - at, "frame length {n}");
                assert!(n - 4 <= max);
                match frame {
                    Frame::Hello { proof, .. } => {
                        assert!(proof.len() <= u16::MAX as usize);
                        hello_done = true;
                    }
                    Frame::Raft(body) => {
                        let _ = wire::decode_raft(body);
                    }
                    Frame::Forward(cmds) => {
                        for c in Commands::new(cmds) {
                            if c.is_err() {
                                break;
                            }
                        }
                    }
                    Frame::Deliver { line, .. } => assert!(line.len() < n),
                    Frame::Ping(_) | Frame::Echo(_) => assert_eq!(n, 13),
                }
                at += n;
            }
            Ok(None) | Err(_) => break,
        }
    }
    if let Ok((_, cmds)) = decode_batch(data) {
        for c in cmds {
            if c.is_err() {
                break;
            }
        }
    }
    let _ = Commands::validate(data);
});
