//! What every decoder fuzz target checks: decoding arbitrary bytes as an envelope and as a bare
//! body never panics, reading an envelope's body without its signature (the cheap refusal of
//! stale adverts) never panics and agrees with the checked read, and anything that decodes
//! re-encodes to the same bytes (the encoding is canonical, so signatures over it are
//! unambiguous).

use pixmarket_protocol::{Message, Signed, codec};

pub fn check<T: Message>(data: &[u8]) {
    if let Ok(env) = Signed::<T>::from_bytes(data) {
        let unchecked = env.decode_unverified();
        if env.verify().is_ok() {
            assert!(unchecked.is_ok(), "a verified body did not decode unchecked");
        }
        if let Ok(again) = env.to_bytes() {
            assert_eq!(again, data, "envelope encoding is not canonical");
        }
    }
    if let Ok(body) = codec::decode::<T>(T::DOMAIN, data, T::MAX_ENCODED) {
        if let Ok(again) = codec::encode(T::DOMAIN, &body, T::MAX_ENCODED) {
            assert_eq!(again, data, "body encoding is not canonical");
        }
    }
}
