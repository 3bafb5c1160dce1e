//! Decoding what a gRPC refusal carries: the `google.rpc` messages (shared with the layers that
//! encode them, `problem::rpc`), the base64 of binary metadata and the percent-encoding of
//! `grpc-message`.

pub(crate) use crate::problem::rpc::*;

/// Decodes gRPC binary metadata: base64, standard alphabet, padded or not (gRPC senders may
/// do either). `None` for anything else.
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim().trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0u32;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A lone sixth of a byte is not base64.
    (bits < 6).then_some(out)
}

/// Decodes a percent-encoded `grpc-message`; bytes that do not form a valid escape stay as
/// they are, invalid UTF-8 is replaced.
pub(crate) fn percent_decode(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_padded_or_not() {
        assert_eq!(base64_decode("").unwrap(), b"");
        assert_eq!(base64_decode("Zg").unwrap(), b"f");
        assert_eq!(base64_decode("Zg==").unwrap(), b"f");
        assert_eq!(base64_decode("Zm8").unwrap(), b"fo");
        assert_eq!(base64_decode("Zm9vYg").unwrap(), b"foob");
        assert_eq!(base64_decode("+/8").unwrap(), [0xfb, 0xff]);
        assert_eq!(base64_decode("Z"), None, "a lone sixth of a byte");
        assert_eq!(base64_decode("Zm9v!"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("80%25 used"), "80% used");
        assert_eq!(percent_decode("21%C2%B0C%0A"), "21°C\n");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
    }
}
