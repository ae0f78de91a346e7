//! UDP beacon packets from anyone on the LAN: never a panic, the table stays bounded, and a
//! postcard is only ever made for the session the entry announced.
#![no_main]
use isthmus_contact::beacon::{Discovery, MAX_HEARD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut table = Discovery::default();
    let now = std::time::Instant::now();
    table.handle_packet("10.0.0.1:7471".parse().expect("addr"), data, now);
    assert!(table.islands().len() <= MAX_HEARD);
    for heard in table.islands() {
        if let Some(card) = heard.postcard() {
            assert_eq!(card.session(), heard.island.session);
            assert_eq!(card.contact.session, heard.island.session);
        }
    }
});
