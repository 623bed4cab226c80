//! The nf_tables netlink wire format: message and attribute constants (from
//! `linux/netlink.h`, `linux/netfilter/nfnetlink.h` and
//! `linux/netfilter/nf_tables.h`), a writer for requests and a reader for
//! answers.
//!
//! Layout reminders: every message is a `nlmsghdr` (host byte order)
//! followed by a 4-byte `nfgenmsg` (family, version, big-endian resource id)
//! and then attributes. Attributes are `u16 len, u16 type` (host order),
//! padded to 4 bytes; nf_tables puts its numbers in big-endian.

// ----- netlink -----

pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLMSG_OVERRUN: u16 = 4;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
/// In a request: create only, an existing object is an error (`EEXIST`).
pub(crate) const NLM_F_EXCL: u16 = 0x200;
pub(crate) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
/// In an NLMSG_ERROR: only the header of the request is echoed.
pub(crate) const NLM_F_CAPPED: u16 = 0x100;
/// In an NLMSG_ERROR: extended-ack attributes follow.
pub(crate) const NLM_F_ACK_TLVS: u16 = 0x200;
/// Extended-ack attribute: a human-readable message.
pub(crate) const NLMSGERR_ATTR_MSG: u16 = 1;
/// Extended-ack attribute: offset of the offending attribute in the request.
pub(crate) const NLMSGERR_ATTR_OFFS: u16 = 2;

const NLA_HDRLEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

// ----- nfnetlink -----

pub(crate) const NFNETLINK_V0: u8 = 0;
pub(crate) const NFNL_SUBSYS_NFTABLES: u16 = 10;
/// NLMSG_MIN_TYPE: batch delimiters are not subsystem messages.
pub(crate) const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
pub(crate) const NFNL_MSG_BATCH_END: u16 = 0x11;

// ----- nf_tables messages -----

pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
pub(crate) const NFT_MSG_GETTABLE: u16 = 1;
pub(crate) const NFT_MSG_DELTABLE: u16 = 2;
pub(crate) const NFT_MSG_NEWCHAIN: u16 = 3;
pub(crate) const NFT_MSG_GETCHAIN: u16 = 4;
pub(crate) const NFT_MSG_DELCHAIN: u16 = 5;
pub(crate) const NFT_MSG_NEWRULE: u16 = 6;
pub(crate) const NFT_MSG_GETRULE: u16 = 7;
pub(crate) const NFT_MSG_DELRULE: u16 = 8;
pub(crate) const NFT_MSG_NEWSET: u16 = 9;
pub(crate) const NFT_MSG_GETSET: u16 = 10;
pub(crate) const NFT_MSG_DELSET: u16 = 11;
pub(crate) const NFT_MSG_NEWSETELEM: u16 = 12;
pub(crate) const NFT_MSG_GETSETELEM: u16 = 13;
pub(crate) const NFT_MSG_DELSETELEM: u16 = 14;
pub(crate) const NFT_MSG_GETGEN: u16 = 16;
// "Delete if present" (Linux 6.3): like the DEL messages, but a missing
// object is not an error.
pub(crate) const NFT_MSG_DESTROYTABLE: u16 = 26;
pub(crate) const NFT_MSG_DESTROYCHAIN: u16 = 27;
pub(crate) const NFT_MSG_DESTROYRULE: u16 = 28;
pub(crate) const NFT_MSG_DESTROYSET: u16 = 29;
pub(crate) const NFT_MSG_DESTROYSETELEM: u16 = 30;

/// The netlink message type of an nf_tables message.
pub(crate) const fn nft_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

// ----- nf_tables attributes -----

pub(crate) const NFTA_GEN_ID: u16 = 1;

pub(crate) const NFTA_TABLE_NAME: u16 = 1;
pub(crate) const NFTA_TABLE_FLAGS: u16 = 2;

pub(crate) const NFTA_CHAIN_TABLE: u16 = 1;
pub(crate) const NFTA_CHAIN_HANDLE: u16 = 2;
pub(crate) const NFTA_CHAIN_NAME: u16 = 3;
pub(crate) const NFTA_CHAIN_HOOK: u16 = 4;
pub(crate) const NFTA_CHAIN_POLICY: u16 = 5;
pub(crate) const NFTA_CHAIN_TYPE: u16 = 7;

pub(crate) const NFTA_HOOK_HOOKNUM: u16 = 1;
pub(crate) const NFTA_HOOK_PRIORITY: u16 = 2;

pub(crate) const NFTA_RULE_TABLE: u16 = 1;
pub(crate) const NFTA_RULE_CHAIN: u16 = 2;
pub(crate) const NFTA_RULE_HANDLE: u16 = 3;
pub(crate) const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(crate) const NFTA_RULE_USERDATA: u16 = 7;

pub(crate) const NFTA_SET_TABLE: u16 = 1;
pub(crate) const NFTA_SET_NAME: u16 = 2;
pub(crate) const NFTA_SET_FLAGS: u16 = 3;
pub(crate) const NFTA_SET_KEY_TYPE: u16 = 4;
pub(crate) const NFTA_SET_KEY_LEN: u16 = 5;
pub(crate) const NFTA_SET_DATA_TYPE: u16 = 6;
pub(crate) const NFTA_SET_DATA_LEN: u16 = 7;
pub(crate) const NFTA_SET_DESC: u16 = 9;
pub(crate) const NFTA_SET_ID: u16 = 10;
pub(crate) const NFTA_SET_TIMEOUT: u16 = 11;
pub(crate) const NFTA_SET_USERDATA: u16 = 13;
pub(crate) const NFTA_SET_HANDLE: u16 = 16;
pub(crate) const NFTA_SET_DESC_SIZE: u16 = 1;
/// The widths of a concatenation's fields (a list of `NFTA_LIST_ELEM {
/// NFTA_SET_FIELD_LEN }`): how the kernel's pipapo set type learns where
/// one field's range ends and the next begins.
pub(crate) const NFTA_SET_DESC_CONCAT: u16 = 2;
/// One field's width in bytes, unpadded (the uapi comment says bits; the
/// kernel and nft use bytes).
pub(crate) const NFTA_SET_FIELD_LEN: u16 = 1;

pub(crate) const NFT_SET_ANONYMOUS: u32 = 0x1;
pub(crate) const NFT_SET_CONSTANT: u32 = 0x2;
/// Elements are ranges (`flags interval`).
pub(crate) const NFT_SET_INTERVAL: u32 = 0x4;
pub(crate) const NFT_SET_MAP: u32 = 0x8;
pub(crate) const NFT_SET_TIMEOUT: u32 = 0x10;
/// "dynamic" in nft: updated from the packet path (dynset).
pub(crate) const NFT_SET_EVAL: u32 = 0x20;
/// The key is a concatenation whose fields' widths come with the set
/// (`NFTA_SET_DESC_CONCAT`); nft sends it for interval sets of
/// concatenations.
pub(crate) const NFT_SET_CONCAT: u32 = 0x80;
/// NFTA_SET_DATA_TYPE of a verdict map (`NFT_DATA_VERDICT`).
pub(crate) const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

pub(crate) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(crate) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(crate) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(crate) const NFTA_SET_ELEM_LIST_SET_ID: u16 = 4;
pub(crate) const NFTA_SET_ELEM_KEY: u16 = 1;
pub(crate) const NFTA_SET_ELEM_DATA: u16 = 2;
pub(crate) const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
pub(crate) const NFTA_SET_ELEM_EXPIRATION: u16 = 5;
/// The last key of a range (inclusive), for interval sets of
/// concatenations.
pub(crate) const NFTA_SET_ELEM_KEY_END: u16 = 10;

/// libnftnl's set userdata TLVs (`NFTNL_UDATA_SET_*`): how nft stores the
/// byte order of keys and values, which it needs to print elements.
pub(crate) const UDATA_SET_KEYBYTEORDER: u8 = 0;
pub(crate) const UDATA_SET_DATABYTEORDER: u8 = 1;

pub(crate) const NFTA_LIST_ELEM: u16 = 1;
pub(crate) const NFTA_EXPR_NAME: u16 = 1;
pub(crate) const NFTA_EXPR_DATA: u16 = 2;

pub(crate) const NFTA_DATA_VALUE: u16 = 1;
pub(crate) const NFTA_DATA_VERDICT: u16 = 2;
pub(crate) const NFTA_VERDICT_CODE: u16 = 1;
pub(crate) const NFTA_VERDICT_CHAIN: u16 = 2;

pub(crate) const NFTA_META_DREG: u16 = 1;
pub(crate) const NFTA_META_KEY: u16 = 2;
pub(crate) const NFTA_META_SREG: u16 = 3;

pub(crate) const NFTA_PAYLOAD_DREG: u16 = 1;
pub(crate) const NFTA_PAYLOAD_BASE: u16 = 2;
pub(crate) const NFTA_PAYLOAD_OFFSET: u16 = 3;
pub(crate) const NFTA_PAYLOAD_LEN: u16 = 4;

pub(crate) const NFTA_CMP_SREG: u16 = 1;
pub(crate) const NFTA_CMP_OP: u16 = 2;
pub(crate) const NFTA_CMP_DATA: u16 = 3;

pub(crate) const NFTA_BITWISE_SREG: u16 = 1;
pub(crate) const NFTA_BITWISE_DREG: u16 = 2;
pub(crate) const NFTA_BITWISE_LEN: u16 = 3;
pub(crate) const NFTA_BITWISE_MASK: u16 = 4;
pub(crate) const NFTA_BITWISE_XOR: u16 = 5;

pub(crate) const NFTA_BYTEORDER_SREG: u16 = 1;
pub(crate) const NFTA_BYTEORDER_DREG: u16 = 2;
pub(crate) const NFTA_BYTEORDER_OP: u16 = 3;
pub(crate) const NFTA_BYTEORDER_LEN: u16 = 4;
pub(crate) const NFTA_BYTEORDER_SIZE: u16 = 5;

pub(crate) const NFTA_CT_DREG: u16 = 1;
pub(crate) const NFTA_CT_KEY: u16 = 2;
pub(crate) const NFTA_CT_SREG: u16 = 4;

pub(crate) const NFTA_IMMEDIATE_DREG: u16 = 1;
pub(crate) const NFTA_IMMEDIATE_DATA: u16 = 2;

pub(crate) const NFTA_COUNTER_BYTES: u16 = 1;
pub(crate) const NFTA_COUNTER_PACKETS: u16 = 2;

pub(crate) const NFTA_NAT_TYPE: u16 = 1;
pub(crate) const NFTA_NAT_FAMILY: u16 = 2;
pub(crate) const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
pub(crate) const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
pub(crate) const NFTA_NAT_FLAGS: u16 = 7;
/// `NF_NAT_RANGE_PROTO_SPECIFIED`.
pub(crate) const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;

pub(crate) const NFTA_MASQ_FLAGS: u16 = 1;

pub(crate) const NFTA_LOOKUP_SET: u16 = 1;
pub(crate) const NFTA_LOOKUP_SREG: u16 = 2;
pub(crate) const NFTA_LOOKUP_DREG: u16 = 3;
pub(crate) const NFTA_LOOKUP_SET_ID: u16 = 4;
pub(crate) const NFTA_LOOKUP_FLAGS: u16 = 5;
/// `NFT_LOOKUP_F_INV`: match when the key is *not* in the set.
pub(crate) const NFT_LOOKUP_F_INV: u32 = 1;

pub(crate) const NFTA_DYNSET_SET_NAME: u16 = 1;
pub(crate) const NFTA_DYNSET_OP: u16 = 3;
pub(crate) const NFTA_DYNSET_SREG_KEY: u16 = 4;
pub(crate) const NFTA_DYNSET_SREG_DATA: u16 = 5;
pub(crate) const NFTA_DYNSET_TIMEOUT: u16 = 6;

pub(crate) const NFTA_FIB_DREG: u16 = 1;
pub(crate) const NFTA_FIB_RESULT: u16 = 2;
pub(crate) const NFTA_FIB_FLAGS: u16 = 3;

pub(crate) const NFTA_REJECT_TYPE: u16 = 1;
pub(crate) const NFTA_REJECT_ICMP_CODE: u16 = 2;

pub(crate) const NFTA_NG_DREG: u16 = 1;
pub(crate) const NFTA_NG_MODULUS: u16 = 2;
pub(crate) const NFTA_NG_TYPE: u16 = 3;
pub(crate) const NFTA_NG_OFFSET: u16 = 4;

/// Register 0 holds the verdict.
pub(crate) const NFT_REG_VERDICT: u32 = 0;

/// Longest table, chain or object name, NUL included (`NFT_NAME_MAXLEN`).
pub(crate) const NFT_NAME_MAXLEN: usize = 256;

/// libnftnl's `NFTNL_UDATA_RULE_COMMENT` TLV type and nft's length limit.
pub(crate) const UDATA_RULE_COMMENT: u8 = 0;
pub(crate) const UDATA_COMMENT_MAXLEN: usize = 128;

// ----- writing -----

/// Appends one netlink message to a buffer; attributes are added through
/// the [`Attrs`] it hands out, the length is patched in at the end.
pub(crate) fn put_message(buf: &mut Vec<u8>, header: MsgHeader, fill: impl FnOnce(&mut Attrs<'_>)) {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched below
    buf.extend_from_slice(&header.ty.to_ne_bytes());
    buf.extend_from_slice(&header.flags.to_ne_bytes());
    buf.extend_from_slice(&header.seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's is 0
    buf.push(header.family);
    buf.push(NFNETLINK_V0);
    buf.extend_from_slice(&header.res_id.to_be_bytes());
    fill(&mut Attrs { buf });
    let len = u32::try_from(buf.len() - start).unwrap_or(u32::MAX);
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// Appends bare attributes (no message header) to a buffer.
pub(crate) fn put_attrs(buf: &mut Vec<u8>, fill: impl FnOnce(&mut Attrs<'_>)) {
    fill(&mut Attrs { buf });
}

/// What goes into the `nlmsghdr` and `nfgenmsg` of a request.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MsgHeader {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub family: u8,
    pub res_id: u16,
}

/// Writes attributes at the end of a message under construction.
pub(crate) struct Attrs<'a> {
    buf: &'a mut Vec<u8>,
}

impl Attrs<'_> {
    pub fn bytes(&mut self, ty: u16, value: &[u8]) {
        let len = NLA_HDRLEN + value.len();
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.pad();
    }

    /// A NUL-terminated string, as the kernel's `NLA_STRING` policy wants.
    pub fn str(&mut self, ty: u16, value: &str) {
        // Written in place: batches carry hundreds of thousands of names.
        let len = NLA_HDRLEN + value.len() + 1;
        self.buf
            .extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(value.as_bytes());
        self.buf.push(0);
        self.pad();
    }

    pub fn u8(&mut self, ty: u16, value: u8) {
        self.bytes(ty, &[value]);
    }

    pub fn u32_be(&mut self, ty: u16, value: u32) {
        self.bytes(ty, &value.to_be_bytes());
    }

    pub fn u64_be(&mut self, ty: u16, value: u64) {
        self.bytes(ty, &value.to_be_bytes());
    }

    /// A nested attribute (flagged `NLA_F_NESTED`, as libmnl does).
    pub fn nested(&mut self, ty: u16, fill: impl FnOnce(&mut Attrs<'_>)) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        fill(&mut Attrs { buf: self.buf });
        // Callers keep nests under 64 KiB (element lists are split into
        // several messages); a longer one would be misread, so it is marked
        // with a length the kernel refuses rather than a wrapped one.
        let len = u16::try_from(self.buf.len() - start).unwrap_or(0);
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// Where the next attribute starts in the whole buffer (to record
    /// offsets that the kernel's extended acks point back to).
    pub fn position(&self) -> usize {
        self.buf.len()
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
}

// ----- reading -----

/// One netlink message of an answer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Message<'a> {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    /// Everything after the `nlmsghdr`.
    pub payload: &'a [u8],
}

/// The `nfgenmsg` family byte of an nf_tables message payload and the
/// attributes after it.
pub(crate) fn nf_split(payload: &[u8]) -> Option<(u8, &[u8])> {
    Some((*payload.first()?, payload.get(4..)?))
}

/// Splits a datagram into its netlink messages; `None` if it is malformed.
pub(crate) fn messages(mut datagram: &[u8]) -> Option<Vec<Message<'_>>> {
    let mut out = Vec::new();
    while datagram.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(datagram[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > datagram.len() {
            return None;
        }
        out.push(Message {
            ty: u16::from_ne_bytes(datagram[4..6].try_into().ok()?),
            flags: u16::from_ne_bytes(datagram[6..8].try_into().ok()?),
            seq: u32::from_ne_bytes(datagram[8..12].try_into().ok()?),
            payload: &datagram[NLMSG_HDRLEN..len],
        });
        datagram = datagram.get(align4(len)..).unwrap_or_default();
    }
    Some(out)
}

/// An NLMSG_ERROR answer: errno 0 is an acknowledgement.
#[derive(Clone, Debug)]
pub(crate) struct Ack {
    /// The sequence number of the request it answers.
    pub seq: u32,
    /// Positive errno, 0 for success.
    pub errno: i32,
    /// The kernel's extended-ack message, if it gave one.
    pub message: Option<String>,
    /// Offset in the request message of the attribute the kernel blamed
    /// (e.g. the one element of a list it refused), if it said.
    pub offset: Option<u32>,
}

pub(crate) fn parse_ack(message: &Message<'_>) -> Option<Ack> {
    let payload = message.payload;
    let error = i32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?);
    let request = payload.get(4..4 + NLMSG_HDRLEN)?;
    let seq = u32::from_ne_bytes(request[8..12].try_into().ok()?);
    let mut text = None;
    let mut offset = None;
    if message.flags & NLM_F_ACK_TLVS != 0 {
        let echoed = if message.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            u32::from_ne_bytes(request[0..4].try_into().ok()?) as usize
        };
        let tlvs = payload.get(4 + align4(echoed)..).unwrap_or_default();
        for (ty, value) in attrs(tlvs) {
            match ty {
                NLMSGERR_ATTR_MSG => text = Some(c_string(value)),
                NLMSGERR_ATTR_OFFS => {
                    offset = value
                        .get(0..4)
                        .and_then(|b| b.try_into().ok())
                        .map(u32::from_ne_bytes);
                }
                _ => {}
            }
        }
    }
    Some(Ack {
        seq,
        errno: error.saturating_neg(),
        message: text.filter(|text| !text.is_empty()),
        offset,
    })
}

/// Iterates over the attributes in `buf` as (type without flags, value).
/// Stops at the first malformed one.
pub(crate) fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < NLA_HDRLEN {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[0], buf[1]]));
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > buf.len() {
            return None;
        }
        let value = &buf[NLA_HDRLEN..len];
        buf = buf.get(align4(len)..).unwrap_or_default();
        Some((ty, value))
    })
}

/// The first attribute of that type.
pub(crate) fn find_attr(buf: &[u8], ty: u16) -> Option<&[u8]> {
    attrs(buf).find(|(t, _)| *t == ty).map(|(_, value)| value)
}

/// A string attribute without its NUL terminator.
pub(crate) fn c_string(value: &[u8]) -> String {
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end]).into_owned()
}

pub(crate) fn be32(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.get(0..4)?.try_into().ok()?))
}

pub(crate) fn be64(value: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(value.get(0..8)?.try_into().ok()?))
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_and_nested_attributes_round_trip() {
        let mut buf = Vec::new();
        let header = MsgHeader {
            ty: nft_type(NFT_MSG_NEWCHAIN),
            flags: NLM_F_REQUEST | NLM_F_ACK,
            seq: 7,
            family: 1,
            res_id: 0,
        };
        put_message(&mut buf, header, |attrs| {
            attrs.str(NFTA_CHAIN_TABLE, "t");
            attrs.nested(NFTA_CHAIN_HOOK, |hook| {
                hook.u32_be(NFTA_HOOK_HOOKNUM, 2);
                hook.u32_be(NFTA_HOOK_PRIORITY, (-5i32) as u32);
            });
        });
        assert_eq!(buf.len() % 4, 0);
        let parsed = messages(&buf).expect("well-formed");
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].seq, 7);
        let (family, body) = nf_split(parsed[0].payload).expect("nfgenmsg");
        assert_eq!(family, 1);
        assert_eq!(c_string(find_attr(body, NFTA_CHAIN_TABLE).unwrap()), "t");
        let hook = find_attr(body, NFTA_CHAIN_HOOK).unwrap();
        assert_eq!(
            find_attr(hook, NFTA_HOOK_PRIORITY).unwrap(),
            &[0xff, 0xff, 0xff, 0xfb]
        );
        // The nested flag is set on the wire but masked when reading.
        let raw_type = u16::from_ne_bytes([body[10], body[11]]);
        assert_eq!(raw_type, NFTA_CHAIN_HOOK | NLA_F_NESTED);
    }

    #[test]
    fn truncated_datagrams_are_refused() {
        let mut buf = Vec::new();
        let header = MsgHeader {
            ty: 1,
            flags: 0,
            seq: 1,
            family: 0,
            res_id: 0,
        };
        put_message(&mut buf, header, |attrs| attrs.str(1, "abc"));
        assert!(messages(&buf[..buf.len() - 4]).is_none());
    }
}
