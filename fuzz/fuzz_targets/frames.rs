//! Bytes from the network: the frame decoders never panic or over-allocate, on either side.
#![no_main]
use bytes::BytesMut;
use isthmus_router::wire::{self, ClientFrame, Message, ServerFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = wire::decode::<ClientFrame>(&mut buf, wire::DEFAULT_MAX_FRAME_BYTES) {}
    let _ = wire::decode_body::<ServerFrame>(data);
    // The frames whose payloads are sliced off the buffer are decoded by hand: both sides.
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = wire::decode::<ServerFrame>(&mut buf, wire::DEFAULT_MAX_FRAME_BYTES) {}
    let mut buf = BytesMut::from(data);
    while let Ok(Some(_)) = wire::decode::<Message>(&mut buf, wire::DEFAULT_MAX_FRAME_BYTES) {}
    if data.len() >= wire::PREAMBLE_LEN {
        let mut pre = [0u8; wire::PREAMBLE_LEN];
        pre.copy_from_slice(&data[..wire::PREAMBLE_LEN]);
        let _ = wire::check_preamble(&pre);
    }
});
