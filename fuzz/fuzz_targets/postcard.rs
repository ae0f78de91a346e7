//! Pasted postcard text: any input parses or is refused, never panics; what parses round-trips,
//! names the session its keys give, and derives its observer postcard.
#![no_main]
use isthmus_contact::Postcard;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(card) = text.parse::<Postcard>() {
            let again: Postcard = card.to_string().parse().expect("a parsed postcard round-trips");
            assert_eq!(again, card);
            assert_eq!(card.contact.session, card.keys.session_id());
            let observer = card.observer().expect("every postcard derives an observer postcard");
            assert_eq!(observer.session(), card.session());
        }
    }
});
