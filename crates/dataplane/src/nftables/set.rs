//! Sets, maps and verdict maps: their types (what `nft list` shows as
//! `type ipv4_addr . inet_proto . inet_service : verdict`), flags, elements
//! and the typed values element keys are built from.
//!
//! A key is the bytes the kernel compares: a single field as it is loaded
//! (an `inet_service` is 2 bytes), a concatenation with every field padded
//! to 4 bytes, because each field was loaded into its own 32-bit register
//! (see [`concat`] and [`crate::nftables::dsl::load`]).
//!
//! Interval sets ([`SetFlags::INTERVAL`]) hold ranges: an element covers
//! every key from its `key` to its `key_end`, field by field (`10 .
//! 0-6553`). Only concatenations of two fields or more are supported: the
//! kernel keeps those in its pipapo set type, which takes a range as one
//! element with both ends. Single-field interval sets live in another type
//! (rbtree) that wants each range as two elements (a start and an
//! exclusive end flagged as such), read back as two as well; they are
//! refused here rather than half supported. The kernel compares the keys of
//! an interval set as big-endian numbers, so nft stores host-order fields
//! (marks, integers) in network order and converts the registers before
//! the lookup: see [`concat_interval`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::verdict::Verdict;
use super::wire::{self, Attrs};
use crate::error::{Error, Result};

/// nft's datatype of one field of a set key or map value. The kernel only
/// stores an id and a length; nft uses them (and the byte order kept in the
/// set's userdata) to print keys as addresses, protocols and ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    /// `ipv4_addr`: 4 bytes, network order.
    Ipv4Addr,
    /// `ipv6_addr`: 16 bytes, network order.
    Ipv6Addr,
    /// `inet_proto`: an IP protocol number, 1 byte (6 tcp, 17 udp, 132 sctp).
    InetProto,
    /// `inet_service`: a port, 2 bytes, network order.
    InetService,
    /// `mark`: a packet or conntrack mark, 4 bytes, host order.
    Mark,
    /// `ifname`: an interface name, 16 bytes, NUL-padded.
    IfName,
    /// `integer` of 4 bytes in host order: what `numgen` produces. nft
    /// knows no width for it, so it cannot print one inside a
    /// concatenation, key or value (`nft list` aborts, `nft -j` prints 0s;
    /// nft's own such sets carry `typeof` userdata, which this module does
    /// not write): there use [`DataType::Mark`], the same 4 host-order
    /// bytes to the kernel.
    Integer,
    /// Any other nft datatype, by nft's id and its length in bytes; also
    /// what a listing returns for a type this module does not name.
    Other { id: u32, len: u32 },
}

/// Bits per field in nft's id of a concatenated type (`TYPE_BITS`).
const TYPE_BITS: u32 = 6;
/// Fields that fit in one 32-bit concatenated type id.
pub const MAX_CONCAT_FIELDS: usize = 5;

/// nft's byte order enum, as stored in set userdata.
const BYTEORDER_INVALID: u32 = 0;
const BYTEORDER_HOST: u32 = 1;
const BYTEORDER_BIG: u32 = 2;

impl DataType {
    /// nft's id of the type (`TYPE_*` in nft's `datatype.h`).
    pub fn id(self) -> u32 {
        match self {
            DataType::Integer => 4,
            DataType::Ipv4Addr => 7,
            DataType::Ipv6Addr => 8,
            DataType::InetProto => 12,
            DataType::InetService => 13,
            DataType::Mark => 19,
            DataType::IfName => 41,
            DataType::Other { id, .. } => id,
        }
    }

    /// Length in bytes of one value of the type.
    pub fn width(self) -> usize {
        match self {
            DataType::InetProto => 1,
            DataType::InetService => 2,
            DataType::Ipv4Addr | DataType::Mark | DataType::Integer => 4,
            DataType::Ipv6Addr | DataType::IfName => 16,
            DataType::Other { len, .. } => len as usize,
        }
    }

    /// The name `nft list` prints.
    pub fn name(self) -> String {
        match self {
            DataType::Ipv4Addr => "ipv4_addr".into(),
            DataType::Ipv6Addr => "ipv6_addr".into(),
            DataType::InetProto => "inet_proto".into(),
            DataType::InetService => "inet_service".into(),
            DataType::Mark => "mark".into(),
            DataType::IfName => "ifname".into(),
            DataType::Integer => "integer".into(),
            DataType::Other { id, len } => format!("type{id}/{len}"),
        }
    }

    /// The named type with this id, if any.
    fn known(id: u32) -> Option<DataType> {
        [
            DataType::Ipv4Addr,
            DataType::Ipv6Addr,
            DataType::InetProto,
            DataType::InetService,
            DataType::Mark,
            DataType::IfName,
            DataType::Integer,
        ]
        .into_iter()
        .find(|t| t.id() == id)
    }

    fn byteorder(self) -> u32 {
        match self {
            DataType::Mark | DataType::Integer | DataType::IfName => BYTEORDER_HOST,
            _ => BYTEORDER_BIG,
        }
    }
}

/// Length of a key (or map value) of these fields: one field as it is, a
/// concatenation with every field rounded up to a 32-bit register.
pub fn concat_len(fields: &[DataType]) -> usize {
    match fields {
        [single] => single.width(),
        _ => fields.iter().map(|f| f.width().next_multiple_of(4)).sum(),
    }
}

/// nft's id of a concatenated type: the fields' ids, 6 bits each.
fn concat_id(fields: &[DataType]) -> u32 {
    fields
        .iter()
        .fold(0, |id, field| (id << TYPE_BITS) | field.id())
}

/// The fields of a type id and key length as the kernel reports them: the
/// inverse of [`concat_id`] where the lengths add up, else one opaque field.
fn fields_of(id: u32, len: usize) -> Vec<DataType> {
    if let Some(single) = DataType::known(id).filter(|t| t.width() == len) {
        return vec![single];
    }
    let mut parts = Vec::new();
    let mut rest = id;
    while rest != 0 {
        parts.push(rest & ((1 << TYPE_BITS) - 1));
        rest >>= TYPE_BITS;
    }
    parts.reverse();
    if parts.len() > 1
        && let Some(fields) = parts
            .iter()
            .map(|part| DataType::known(*part))
            .collect::<Option<Vec<_>>>()
        && concat_len(&fields) == len
    {
        return fields;
    }
    vec![DataType::Other {
        id,
        len: len as u32,
    }]
}

/// What a map maps to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MapData {
    /// A verdict map (`: verdict`): `accept`, `drop`, `goto CHAIN`, ...
    Verdict,
    /// Values of these fields (`: ipv4_addr . inet_service`).
    Value(Vec<DataType>),
}

/// Set flags as nft names them (`flags constant, timeout, dynamic`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SetFlags(u32);

impl SetFlags {
    pub const NONE: SetFlags = SetFlags(0);
    /// `constant`: elements cannot change once a rule uses the set.
    pub const CONSTANT: SetFlags = SetFlags(wire::NFT_SET_CONSTANT);
    /// `timeout`: elements may expire (a default timeout or their own).
    pub const TIMEOUT: SetFlags = SetFlags(wire::NFT_SET_TIMEOUT);
    /// `dynamic`: rules may add and update elements ([`super::Expr::Dynset`]).
    pub const DYNAMIC: SetFlags = SetFlags(wire::NFT_SET_EVAL);
    /// `interval`: elements are ranges ([`SetElem::range`]). Only for keys
    /// of two fields or more (see the module docs); the set is then sent
    /// with the kernel's concat flag and its fields' widths, as nft sends
    /// it, and read back without them.
    pub const INTERVAL: SetFlags = SetFlags(wire::NFT_SET_INTERVAL);

    /// The kernel's bits (`NFT_SET_*`).
    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn contains(self, other: SetFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Only the bits this type names; the kernel's others (map, anonymous)
    /// are described elsewhere, and concat is implied by an interval key of
    /// several fields: left out, a spec reads back as it was added.
    fn from_kernel(bits: u32) -> SetFlags {
        SetFlags(
            bits & (wire::NFT_SET_CONSTANT
                | wire::NFT_SET_INTERVAL
                | wire::NFT_SET_TIMEOUT
                | wire::NFT_SET_EVAL),
        )
    }
}

impl std::ops::BitOr for SetFlags {
    type Output = SetFlags;
    fn bitor(self, other: SetFlags) -> SetFlags {
        SetFlags(self.0 | other.0)
    }
}

impl fmt::Display for SetFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (SetFlags::CONSTANT, "constant"),
            (SetFlags::INTERVAL, "interval"),
            (SetFlags::DYNAMIC, "dynamic"),
            (SetFlags::TIMEOUT, "timeout"),
        ]
        .into_iter()
        .filter(|(flag, _)| self.contains(*flag))
        .map(|(_, name)| name)
        .collect();
        f.write_str(&names.join(","))
    }
}

/// A named set, map or verdict map: `add set|map FAMILY TABLE NAME { type
/// KEY [: DATA]; flags FLAGS; timeout T; size N; }`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SetSpec {
    /// One field, or several for a concatenation (`ipv4_addr . inet_proto
    /// . inet_service`), at most [`MAX_CONCAT_FIELDS`].
    pub key: Vec<DataType>,
    /// `None` for a set; what it maps to for a map.
    pub data: Option<MapData>,
    pub flags: SetFlags,
    /// Default lifetime of elements added without their own (needs
    /// [`SetFlags::TIMEOUT`]).
    pub timeout: Option<Duration>,
    /// Most elements the set may hold. Read back, the kernel's own value
    /// (it gives dynamic sets 65535 when none was asked for).
    pub size: Option<u32>,
}

impl SetSpec {
    /// A set of keys of these fields, no flags.
    pub fn set(key: &[DataType]) -> SetSpec {
        SetSpec {
            key: key.to_vec(),
            data: None,
            flags: SetFlags::NONE,
            timeout: None,
            size: None,
        }
    }

    /// A map from keys to values of the `value` fields.
    pub fn map(key: &[DataType], value: &[DataType]) -> SetSpec {
        SetSpec {
            data: Some(MapData::Value(value.to_vec())),
            ..SetSpec::set(key)
        }
    }

    /// A verdict map from keys to verdicts.
    pub fn vmap(key: &[DataType]) -> SetSpec {
        SetSpec {
            data: Some(MapData::Verdict),
            ..SetSpec::set(key)
        }
    }

    /// Adds flags.
    pub fn with_flags(mut self, flags: SetFlags) -> SetSpec {
        self.flags = self.flags | flags;
        self
    }

    /// A default element timeout (and the [`SetFlags::TIMEOUT`] it needs).
    pub fn with_timeout(mut self, timeout: Duration) -> SetSpec {
        self.flags = self.flags | SetFlags::TIMEOUT;
        self.timeout = Some(timeout);
        self
    }

    pub fn with_size(mut self, size: u32) -> SetSpec {
        self.size = Some(size);
        self
    }

    /// Bytes of each key.
    pub fn key_len(&self) -> usize {
        concat_len(&self.key)
    }

    /// "set", "map" or "verdict map", for messages.
    pub(crate) fn noun(&self) -> &'static str {
        match self.data {
            None => "set",
            Some(MapData::Value(_)) => "map",
            Some(MapData::Verdict) => "verdict map",
        }
    }

    /// Refuses what the kernel would refuse or nft could not list.
    pub(crate) fn check(&self) -> Result<()> {
        check_fields("set key", &self.key)?;
        if let Some(MapData::Value(value)) = &self.data {
            check_fields("map value", value)?;
        }
        if let Some(timeout) = self.timeout {
            if !self.flags.contains(SetFlags::TIMEOUT) {
                return Err(Error::invalid(
                    "set timeout",
                    format!("{timeout:?}"),
                    "needs SetFlags::TIMEOUT (use SetSpec::with_timeout)",
                ));
            }
            timeout_ms("set timeout", timeout)?;
        }
        if self.size == Some(0) {
            return Err(Error::invalid("set size", "0", "at least 1"));
        }
        if self.flags.contains(SetFlags::INTERVAL) {
            if self.key.len() < 2 {
                return Err(Error::invalid(
                    "set flags",
                    self.flags.to_string(),
                    format!(
                        "an interval set needs a key of two fields or more (`{}` has one): \
                         single-field ranges (the kernel's rbtree) are not supported; \
                         concatenate a constant field to use one",
                        self.key[0].name()
                    ),
                ));
            }
            if self.flags.contains(SetFlags::DYNAMIC) {
                // No set type of the kernel has both (EOPNOTSUPP).
                return Err(Error::invalid(
                    "set flags",
                    self.flags.to_string(),
                    "an interval set cannot be dynamic",
                ));
            }
        }
        Ok(())
    }

    /// Whether the set is sent as a concatenation with its fields' widths
    /// (`NFT_SET_CONCAT`): what the kernel needs to hold ranges of several
    /// fields, and what nft sends for them.
    fn is_concat_interval(&self) -> bool {
        self.flags.contains(SetFlags::INTERVAL) && self.key.len() > 1
    }

    /// Checks an element against this spec: key and value lengths, value
    /// kind, timeout allowed.
    pub(crate) fn check_element(&self, index: usize, elem: &SetElem) -> Result<()> {
        let at = |what: &str| format!("element {index} {what}");
        if elem.key.len() != self.key_len() {
            return Err(Error::invalid(
                "element key",
                hex(&elem.key),
                format!(
                    "{}: {} bytes, the set's key has {}",
                    at("key"),
                    elem.key.len(),
                    self.key_len()
                ),
            ));
        }
        match (&self.data, &elem.value) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "element value",
                    "",
                    format!("{}: a set has no values", at("value")),
                ));
            }
            (Some(_), None) => {
                return Err(Error::invalid(
                    "element value",
                    hex(&elem.key),
                    format!("{}: missing, a map needs one for each key", at("value")),
                ));
            }
            (Some(MapData::Verdict), Some(ElemValue::Data(data))) => {
                return Err(Error::invalid(
                    "element value",
                    hex(data),
                    format!("{}: a verdict map maps to verdicts", at("value")),
                ));
            }
            (Some(MapData::Value(_)), Some(ElemValue::Verdict(verdict))) => {
                return Err(Error::invalid(
                    "element value",
                    verdict.to_string(),
                    format!("{}: this map maps to data, not verdicts", at("value")),
                ));
            }
            (Some(MapData::Value(fields)), Some(ElemValue::Data(data))) => {
                if data.len() != concat_len(fields) {
                    return Err(Error::invalid(
                        "element value",
                        hex(data),
                        format!(
                            "{}: {} bytes, the map's values have {}",
                            at("value"),
                            data.len(),
                            concat_len(fields)
                        ),
                    ));
                }
            }
            (Some(MapData::Verdict), Some(ElemValue::Verdict(_))) => {}
        }
        if let Some(end) = &elem.key_end {
            self.check_key_end(index, &elem.key, end)?;
        }
        if elem.timeout.is_some() && !self.flags.contains(SetFlags::TIMEOUT) {
            return Err(Error::invalid(
                "element timeout",
                format!("{:?}", elem.timeout.unwrap_or_default()),
                format!("{}: the set has no SetFlags::TIMEOUT", at("timeout")),
            ));
        }
        Ok(())
    }

    /// Checks the end of a range against this spec: the set holds ranges,
    /// the end is as long as a key, and no field's end is below its start
    /// (compared as the kernel does, bytes as a big-endian number).
    pub(crate) fn check_key_end(&self, index: usize, key: &[u8], end: &[u8]) -> Result<()> {
        let at = format!("element {index} key end");
        if !self.flags.contains(SetFlags::INTERVAL) {
            return Err(Error::invalid(
                "element key end",
                hex(end),
                format!("{at}: the set has no SetFlags::INTERVAL"),
            ));
        }
        if end.len() != self.key_len() {
            return Err(Error::invalid(
                "element key end",
                hex(end),
                format!(
                    "{at}: {} bytes, the set's key has {}",
                    end.len(),
                    self.key_len()
                ),
            ));
        }
        let mut offset = 0;
        for (n, field) in self.key.iter().enumerate() {
            let width = field.width();
            let range = offset..offset + width;
            if key.get(range.clone()) > end.get(range) {
                return Err(Error::invalid(
                    "element key end",
                    format!("{} - {}", hex(key), hex(end)),
                    format!(
                        "{at}: field {} ({}) ends below where it starts",
                        n + 1,
                        field.name()
                    ),
                ));
            }
            offset += width.next_multiple_of(4);
        }
        Ok(())
    }
}

fn check_fields(what: &'static str, fields: &[DataType]) -> Result<()> {
    let names = || {
        fields
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(" . ")
    };
    if fields.is_empty() {
        return Err(Error::invalid(what, "", "at least one field"));
    }
    if fields.len() > MAX_CONCAT_FIELDS {
        return Err(Error::invalid(
            what,
            names(),
            format!(
                "at most {MAX_CONCAT_FIELDS} fields (nft's concatenated type id holds no more)"
            ),
        ));
    }
    if let Some(bad) = fields
        .iter()
        .find(|f| f.width() == 0 || f.id() >= 1 << TYPE_BITS)
    {
        return Err(Error::invalid(
            what,
            bad.name(),
            "a type id below 64 and a length of at least 1 byte",
        ));
    }
    let len = concat_len(fields);
    if len > DATA_MAXLEN {
        return Err(Error::invalid(
            what,
            names(),
            format!("{len} bytes, at most {DATA_MAXLEN} fit in the registers"),
        ));
    }
    Ok(())
}

/// `NFT_DATA_VALUE_MAXLEN`: all registers together.
const DATA_MAXLEN: usize = 64;

/// Milliseconds for the kernel: at least 1, and few enough that the kernel
/// can turn them into nanoseconds (it refuses more with ERANGE).
pub(crate) fn timeout_ms(field: &'static str, timeout: Duration) -> Result<u64> {
    let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 || ms >= u64::MAX / 1_000_000 {
        return Err(Error::invalid(
            field,
            format!("{timeout:?}"),
            "1 ms to about 584 years",
        ));
    }
    Ok(ms)
}

/// The value an element maps to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ElemValue {
    /// For a map: bytes as [`concat`] builds them from the value's fields.
    Data(Vec<u8>),
    /// For a verdict map.
    Verdict(Verdict),
}

/// One element: a key (or a range of keys), for maps its value, and
/// optionally its own timeout.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SetElem {
    /// Bytes as [`concat()`] builds them from the key's fields; for a range,
    /// its first key.
    pub key: Vec<u8>,
    /// For an interval set ([`SetFlags::INTERVAL`]): the range's last key,
    /// inclusive, laid out as `key` (in an interval set, by
    /// [`concat_interval`]); every field's end at least its start. `None`
    /// in an interval set: the range of `key` alone.
    pub key_end: Option<Vec<u8>>,
    pub value: Option<ElemValue>,
    /// Expires after this long (the set needs [`SetFlags::TIMEOUT`]);
    /// `None`: the set's default timeout, if any.
    pub timeout: Option<Duration>,
}

impl SetElem {
    /// A set element.
    pub fn key(key: Vec<u8>) -> SetElem {
        SetElem {
            key,
            key_end: None,
            value: None,
            timeout: None,
        }
    }

    /// An element of an interval set covering `key` to `key_end`, both
    /// included, field by field: `10 . 0-6553` of `mark . mark` is
    /// `concat_interval(&[Mark(10), Mark(0)])` to
    /// `concat_interval(&[Mark(10), Mark(6553)])`. For a map, give it
    /// its value with [`SetElem::with_value`] (or start from
    /// [`SetElem::mapping`] and add the end with [`SetElem::with_end`]).
    pub fn range(key: Vec<u8>, key_end: Vec<u8>) -> SetElem {
        SetElem::key(key).with_end(key_end)
    }

    /// Makes the element a range ending at `key_end` (inclusive).
    pub fn with_end(mut self, key_end: Vec<u8>) -> SetElem {
        self.key_end = Some(key_end);
        self
    }

    /// Gives the element a value (bytes as [`concat()`] builds them), for a
    /// map.
    pub fn with_value(mut self, value: Vec<u8>) -> SetElem {
        self.value = Some(ElemValue::Data(value));
        self
    }

    /// A map element `KEY : VALUE`.
    pub fn mapping(key: Vec<u8>, value: Vec<u8>) -> SetElem {
        SetElem {
            value: Some(ElemValue::Data(value)),
            ..SetElem::key(key)
        }
    }

    /// A verdict map element `KEY : VERDICT`.
    pub fn verdict(key: Vec<u8>, verdict: Verdict) -> SetElem {
        SetElem {
            value: Some(ElemValue::Verdict(verdict)),
            ..SetElem::key(key)
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> SetElem {
        self.timeout = Some(timeout);
        self
    }

    /// Checks what can be checked without the set's type.
    pub(crate) fn check(&self, index: usize) -> Result<()> {
        if self.key.is_empty() || self.key.len() > DATA_MAXLEN {
            return Err(Error::invalid(
                "element key",
                hex(&self.key),
                format!(
                    "element {index}: {} bytes (1 to {DATA_MAXLEN} allowed)",
                    self.key.len()
                ),
            ));
        }
        if let Some(end) = &self.key_end
            && end.len() != self.key.len()
        {
            return Err(Error::invalid(
                "element key end",
                hex(end),
                format!(
                    "element {index}: {} bytes, its key has {}",
                    end.len(),
                    self.key.len()
                ),
            ));
        }
        match &self.value {
            Some(ElemValue::Data(data)) if data.is_empty() || data.len() > DATA_MAXLEN => {
                return Err(Error::invalid(
                    "element value",
                    hex(data),
                    format!(
                        "element {index}: {} bytes (1 to {DATA_MAXLEN} allowed)",
                        data.len()
                    ),
                ));
            }
            Some(ElemValue::Verdict(verdict)) => verdict.check()?,
            _ => {}
        }
        if let Some(timeout) = self.timeout {
            timeout_ms("element timeout", timeout)?;
        }
        Ok(())
    }

    /// Upper bound of the encoded size, to split element lists into
    /// messages whose nested list stays under 64 KiB.
    pub(crate) fn encoded_size_bound(&self) -> usize {
        let value = match &self.value {
            None => 0,
            Some(ElemValue::Data(data)) => 8 + data.len().next_multiple_of(4) + 4,
            Some(ElemValue::Verdict(_)) => 12 + 8 + 4 + wire::NFT_NAME_MAXLEN,
        };
        let key_end = self
            .key_end
            .as_ref()
            .map_or(0, |end| 8 + end.len().next_multiple_of(4));
        4 + 8 + self.key.len().next_multiple_of(4) + key_end + 4 + value + 12 + 8
    }

    /// Writes the element as one `NFTA_LIST_ELEM` of an element list.
    pub(crate) fn encode(&self, list: &mut Attrs<'_>) {
        use wire::*;
        list.nested(NFTA_LIST_ELEM, |e| {
            if let Some(timeout) = self.timeout {
                // Checked before encoding.
                let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
                e.u64_be(NFTA_SET_ELEM_TIMEOUT, ms);
            }
            e.nested(NFTA_SET_ELEM_KEY, |k| k.bytes(NFTA_DATA_VALUE, &self.key));
            if let Some(end) = &self.key_end {
                e.nested(NFTA_SET_ELEM_KEY_END, |k| k.bytes(NFTA_DATA_VALUE, end));
            }
            match &self.value {
                None => {}
                Some(ElemValue::Data(data)) => {
                    e.nested(NFTA_SET_ELEM_DATA, |d| d.bytes(NFTA_DATA_VALUE, data));
                }
                Some(ElemValue::Verdict(verdict)) => {
                    e.nested(NFTA_SET_ELEM_DATA, |d| verdict.encode_data(d));
                }
            }
        });
    }
}

/// Which element to delete ([`super::Batch::delete_elements`]): its key,
/// and for a range of an interval set its last key too, as nft sends it. A
/// plain key converts into one (`vec![10, 0, 0, 1].into()`), as do the
/// elements added ([`SetElem`]) and listed ([`ElementInfo`]).
///
/// The kernel (its pipapo set type, Linux 6.18) deletes the range that
/// holds `key`, without comparing the end: any key inside a range deletes
/// it. So in a batch that replaces ranges, delete the old ones before
/// adding the new (which may hold the old starts), as
/// [`super::Batch::add_elements`] already asks for changed values.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ElemKey {
    pub key: Vec<u8>,
    /// The range's last key, as it was added ([`SetElem::key_end`]);
    /// checked against the set's type, not used by the kernel to find the
    /// range.
    pub end: Option<Vec<u8>>,
}

impl ElemKey {
    /// The range from `key` to `end`, both included.
    pub fn range(key: Vec<u8>, end: Vec<u8>) -> ElemKey {
        ElemKey {
            key,
            end: Some(end),
        }
    }

    /// Checks what can be checked without the set's type.
    pub(crate) fn check(&self, index: usize) -> Result<()> {
        // The same rules as for an element of that key.
        SetElem {
            key_end: self.end.clone(),
            ..SetElem::key(self.key.clone())
        }
        .check(index)
    }

    /// Checks the key against the set's spec.
    pub(crate) fn check_against(&self, index: usize, spec: &SetSpec) -> Result<()> {
        if self.key.len() != spec.key_len() {
            return Err(Error::invalid(
                "element key",
                hex(&self.key),
                format!(
                    "element {index}: {} bytes, the set's key has {}",
                    self.key.len(),
                    spec.key_len()
                ),
            ));
        }
        match &self.end {
            Some(end) => spec.check_key_end(index, &self.key, end),
            None => Ok(()),
        }
    }

    /// Upper bound of the encoded size (see [`SetElem::encoded_size_bound`]).
    pub(crate) fn encoded_size_bound(&self) -> usize {
        let end = self
            .end
            .as_ref()
            .map_or(0, |end| 8 + end.len().next_multiple_of(4));
        4 + 8 + self.key.len().next_multiple_of(4) + end
    }

    /// Writes the key as one `NFTA_LIST_ELEM` of an element list.
    pub(crate) fn encode(&self, list: &mut Attrs<'_>) {
        use wire::*;
        list.nested(NFTA_LIST_ELEM, |e| {
            e.nested(NFTA_SET_ELEM_KEY, |k| k.bytes(NFTA_DATA_VALUE, &self.key));
            if let Some(end) = &self.end {
                e.nested(NFTA_SET_ELEM_KEY_END, |k| k.bytes(NFTA_DATA_VALUE, end));
            }
        });
    }
}

impl fmt::Display for ElemKey {
    /// As `nft --debug=netlink` shows keys, a range as `START - END`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.end {
            Some(end) => write!(f, "{} - {}", hex(&self.key), hex(end)),
            None => f.write_str(&hex(&self.key)),
        }
    }
}

impl From<Vec<u8>> for ElemKey {
    fn from(key: Vec<u8>) -> ElemKey {
        ElemKey { key, end: None }
    }
}

impl From<&SetElem> for ElemKey {
    fn from(elem: &SetElem) -> ElemKey {
        ElemKey {
            key: elem.key.clone(),
            end: elem.key_end.clone(),
        }
    }
}

impl From<&ElementInfo> for ElemKey {
    fn from(elem: &ElementInfo) -> ElemKey {
        ElemKey {
            key: elem.key.clone(),
            end: elem.key_end.clone(),
        }
    }
}

/// An anonymous set or map: created with the rule that uses it, in the
/// same transaction, constant, and deleted with the rule. What nft makes of
/// `{ 0 : goto a, 1 : goto b }` in `numgen random mod 2 vmap { ... }`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AnonSet {
    pub key: Vec<DataType>,
    pub data: Option<MapData>,
    /// At least one; no timeouts.
    pub elements: Vec<SetElem>,
}

impl AnonSet {
    pub(crate) fn spec(&self) -> SetSpec {
        SetSpec {
            key: self.key.clone(),
            data: self.data.clone(),
            flags: SetFlags::CONSTANT,
            timeout: None,
            size: Some(u32::try_from(self.elements.len()).unwrap_or(u32::MAX)),
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        let spec = self.spec();
        spec.check()?;
        if self.elements.is_empty() {
            return Err(Error::invalid(
                "anonymous set",
                "{}",
                "at least one element (an empty set matches nothing: leave the rule out)",
            ));
        }
        for (i, elem) in self.elements.iter().enumerate() {
            elem.check(i)?;
            spec.check_element(i, elem)?;
        }
        Ok(())
    }
}

/// The attributes of a NEWSET message, shared by named and anonymous sets.
pub(crate) fn encode_set(
    a: &mut Attrs<'_>,
    table: &str,
    name: &str,
    spec: &SetSpec,
    extra_flags: u32,
    id: u32,
) {
    use wire::*;
    a.str(NFTA_SET_TABLE, table);
    a.str(NFTA_SET_NAME, name);
    let map = if spec.data.is_some() { NFT_SET_MAP } else { 0 };
    let concat = if spec.is_concat_interval() {
        NFT_SET_CONCAT
    } else {
        0
    };
    a.u32_be(
        NFTA_SET_FLAGS,
        spec.flags.bits() | map | concat | extra_flags,
    );
    a.u32_be(NFTA_SET_KEY_TYPE, concat_id(&spec.key));
    a.u32_be(NFTA_SET_KEY_LEN, spec.key_len() as u32);
    match &spec.data {
        None => {}
        Some(MapData::Verdict) => {
            a.u32_be(NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
            // Ignored for verdicts; nft sends 0.
            a.u32_be(NFTA_SET_DATA_LEN, 0);
        }
        Some(MapData::Value(fields)) => {
            a.u32_be(NFTA_SET_DATA_TYPE, concat_id(fields));
            a.u32_be(NFTA_SET_DATA_LEN, concat_len(fields) as u32);
        }
    }
    a.u32_be(NFTA_SET_ID, id);
    if let Some(timeout) = spec.timeout {
        a.u64_be(
            NFTA_SET_TIMEOUT,
            u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        );
    }
    if spec.size.is_some() || concat != 0 {
        a.nested(NFTA_SET_DESC, |d| {
            if let Some(size) = spec.size {
                d.u32_be(NFTA_SET_DESC_SIZE, size);
            }
            if concat != 0 {
                // Each field's own width: the kernel rounds them up to
                // registers itself and checks they add up to the key.
                d.nested(NFTA_SET_DESC_CONCAT, |fields| {
                    for field in &spec.key {
                        fields.nested(NFTA_LIST_ELEM, |f| {
                            f.u32_be(NFTA_SET_FIELD_LEN, field.width() as u32);
                        });
                    }
                });
            }
        });
    }
    a.bytes(NFTA_SET_USERDATA, &set_userdata(spec));
}

/// The byte orders nft keeps in a set's userdata (native-endian u32 TLVs):
/// without them nft prints host-order keys such as numgen results wrongly.
fn set_userdata(spec: &SetSpec) -> Vec<u8> {
    let order = |fields: &[DataType]| match fields {
        [single] => single.byteorder(),
        _ => BYTEORDER_INVALID,
    };
    let mut userdata = Vec::with_capacity(12);
    let mut tlv = |ty: u8, value: u32| {
        userdata.extend_from_slice(&[ty, 4]);
        userdata.extend_from_slice(&value.to_ne_bytes());
    };
    tlv(UDATA_SET_KEYBYTEORDER, order(&spec.key));
    match &spec.data {
        None => {}
        Some(MapData::Verdict) => tlv(UDATA_SET_DATABYTEORDER, BYTEORDER_INVALID),
        Some(MapData::Value(fields)) => tlv(UDATA_SET_DATABYTEORDER, order(fields)),
    }
    userdata
}

use wire::{UDATA_SET_DATABYTEORDER, UDATA_SET_KEYBYTEORDER};

/// A set as the kernel describes it (see [`super::Nft::sets`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetInfo {
    pub name: String,
    pub handle: u64,
    /// Key and value types decoded from nft's type ids; flags as
    /// [`SetFlags`] names them.
    pub spec: SetSpec,
    /// Created with a rule (named `__set0`, `__map1`, ... by the kernel).
    pub anonymous: bool,
}

impl SetInfo {
    pub(crate) fn parse(body: &[u8]) -> Option<SetInfo> {
        use wire::*;
        let field = |ty| find_attr(body, ty);
        let name = c_string(field(NFTA_SET_NAME)?);
        let handle = field(NFTA_SET_HANDLE).and_then(be64).unwrap_or(0);
        let flags = field(NFTA_SET_FLAGS).and_then(be32).unwrap_or(0);
        let key_type = field(NFTA_SET_KEY_TYPE).and_then(be32).unwrap_or(0);
        let key_len = field(NFTA_SET_KEY_LEN).and_then(be32).unwrap_or(0) as usize;
        let data = if flags & NFT_SET_MAP != 0 {
            let data_type = field(NFTA_SET_DATA_TYPE).and_then(be32).unwrap_or(0);
            if data_type == NFT_DATA_VERDICT {
                Some(MapData::Verdict)
            } else {
                let len = field(NFTA_SET_DATA_LEN).and_then(be32).unwrap_or(0) as usize;
                Some(MapData::Value(fields_of(data_type, len)))
            }
        } else {
            None
        };
        let timeout = field(NFTA_SET_TIMEOUT)
            .and_then(be64)
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis);
        let size = field(NFTA_SET_DESC)
            .and_then(|desc| find_attr(desc, NFTA_SET_DESC_SIZE))
            .and_then(be32);
        Some(SetInfo {
            name,
            handle,
            spec: SetSpec {
                key: fields_of(key_type, key_len),
                data,
                flags: SetFlags::from_kernel(flags),
                timeout,
                size,
            },
            anonymous: flags & NFT_SET_ANONYMOUS != 0,
        })
    }
}

/// An element as the kernel lists it (see [`super::Nft::elements`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElementInfo {
    pub key: Vec<u8>,
    /// The last key of a range (interval sets).
    pub key_end: Option<Vec<u8>>,
    pub value: Option<ElemValue>,
    /// Its timeout (its own or the set's default at the time it was added).
    pub timeout: Option<Duration>,
    /// Time left until it expires.
    pub expires: Option<Duration>,
}

impl ElementInfo {
    /// The elements of one NEWSETELEM answer of a dump.
    pub(crate) fn parse_list(body: &[u8], out: &mut Vec<ElementInfo>) {
        use wire::*;
        let Some(list) = find_attr(body, NFTA_SET_ELEM_LIST_ELEMENTS) else {
            return;
        };
        for (ty, elem) in wire::attrs(list) {
            if ty != NFTA_LIST_ELEM {
                continue;
            }
            let field = |ty| find_attr(elem, ty);
            // A catch-all element has no key.
            let Some(key) = field(NFTA_SET_ELEM_KEY).and_then(|k| find_attr(k, NFTA_DATA_VALUE))
            else {
                continue;
            };
            let value = field(NFTA_SET_ELEM_DATA).and_then(|data| {
                if let Some(verdict) = find_attr(data, NFTA_DATA_VERDICT) {
                    Verdict::parse(verdict).map(ElemValue::Verdict)
                } else {
                    find_attr(data, NFTA_DATA_VALUE).map(|v| ElemValue::Data(v.to_vec()))
                }
            });
            let ms = |ty| field(ty).and_then(be64).map(Duration::from_millis);
            let key_end = field(NFTA_SET_ELEM_KEY_END)
                .and_then(|k| find_attr(k, NFTA_DATA_VALUE))
                .map(<[u8]>::to_vec);
            out.push(ElementInfo {
                key: key.to_vec(),
                key_end,
                value,
                timeout: ms(NFTA_SET_ELEM_TIMEOUT),
                expires: ms(NFTA_SET_ELEM_EXPIRATION),
            });
        }
    }
}

/// A typed value of one field, to build keys and map values with
/// [`concat`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Datum {
    Ipv4(Ipv4Addr),
    Ipv6(Ipv6Addr),
    /// An IP protocol number (`inet_proto`).
    Proto(u8),
    /// A port (`inet_service`).
    Port(u16),
    Mark(u32),
    /// An interface name, at most 15 bytes (longer ones are cut).
    IfName(String),
    /// A host-order integer (`numgen` results).
    Integer(u32),
}

impl Datum {
    pub fn data_type(&self) -> DataType {
        match self {
            Datum::Ipv4(_) => DataType::Ipv4Addr,
            Datum::Ipv6(_) => DataType::Ipv6Addr,
            Datum::Proto(_) => DataType::InetProto,
            Datum::Port(_) => DataType::InetService,
            Datum::Mark(_) => DataType::Mark,
            Datum::IfName(_) => DataType::IfName,
            Datum::Integer(_) => DataType::Integer,
        }
    }

    /// The bytes the kernel compares, in the type's byte order.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Datum::Ipv4(addr) => addr.octets().to_vec(),
            Datum::Ipv6(addr) => addr.octets().to_vec(),
            Datum::Proto(proto) => vec![*proto],
            Datum::Port(port) => port.to_be_bytes().to_vec(),
            Datum::Mark(value) | Datum::Integer(value) => value.to_ne_bytes().to_vec(),
            Datum::IfName(name) => {
                let mut bytes = name.as_bytes().to_vec();
                bytes.truncate(15);
                bytes.resize(16, 0);
                bytes
            }
        }
    }
}

impl From<IpAddr> for Datum {
    fn from(addr: IpAddr) -> Datum {
        match addr {
            IpAddr::V4(v4) => Datum::Ipv4(v4),
            IpAddr::V6(v6) => Datum::Ipv6(v6),
        }
    }
}

/// The bytes of a key or map value: one datum as it is, several
/// concatenated with each padded to 4 bytes (as they sit in consecutive
/// 32-bit registers). `concat(&[Datum::Ipv4(a), Datum::Proto(6),
/// Datum::Port(80)])` is the key of `a . tcp . 80`.
pub fn concat(parts: &[Datum]) -> Vec<u8> {
    match parts {
        [single] => single.bytes(),
        _ => {
            let mut out = Vec::with_capacity(parts.len() * 4);
            for part in parts {
                out.extend_from_slice(&part.bytes());
                out.resize(out.len().next_multiple_of(4), 0);
            }
            out
        }
    }
}

/// The bytes of a key (or key end) of an interval set: as [`concat()`], but
/// host-order fields ([`Datum::Mark`], [`Datum::Integer`]) in network
/// order. The kernel compares an interval set's keys as big-endian
/// numbers, so nft stores them so, and a rule that looks such a key up
/// converts those registers first (an [`super::Expr::Byteorder`] hton of 4
/// bytes, as nft adds for `meta mark . meta mark @m`).
pub fn concat_interval(parts: &[Datum]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.len() * 4);
    for part in parts {
        match part {
            Datum::Mark(value) | Datum::Integer(value) => {
                out.extend_from_slice(&value.to_be_bytes());
            }
            other => out.extend_from_slice(&other.bytes()),
        }
        if parts.len() > 1 {
            out.resize(out.len().next_multiple_of(4), 0);
        }
    }
    out
}

/// Bytes as `nft --debug=netlink` prints them, in 32-bit words
/// (`0100000a 00000006`), for error messages.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(4)
        .map(|word| word.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concatenated_types_get_nfts_ids_and_lengths() {
        let key = [
            DataType::Ipv4Addr,
            DataType::InetProto,
            DataType::InetService,
        ];
        // What nft sends for `type ipv4_addr . inet_proto . inet_service`.
        assert_eq!(concat_id(&key), 0x730d);
        assert_eq!(concat_len(&key), 12);
        assert_eq!(fields_of(0x730d, 12), key.to_vec());
        assert_eq!(concat_len(&[DataType::InetService]), 2);
        assert_eq!(fields_of(13, 2), vec![DataType::InetService]);
        // A length that does not add up stays opaque.
        assert_eq!(
            fields_of(0x730d, 16),
            vec![DataType::Other {
                id: 0x730d,
                len: 16
            }]
        );
        let v6 = [
            DataType::Ipv6Addr,
            DataType::InetProto,
            DataType::InetService,
        ];
        assert_eq!(fields_of(concat_id(&v6), 24), v6.to_vec());
    }

    #[test]
    fn keys_pad_each_field_of_a_concatenation() {
        let key = concat(&[
            Datum::Ipv4("10.0.0.1".parse().unwrap()),
            Datum::Proto(6),
            Datum::Port(80),
        ]);
        // nft: `element 0100000a 00000006 00005000` (words in host order).
        assert_eq!(key, [10, 0, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
        assert_eq!(hex(&key), "0a000001 06000000 00500000");
        assert_eq!(concat(&[Datum::Port(80)]), [0, 80]);
    }

    #[test]
    fn userdata_holds_byte_orders_as_nft_writes_them() {
        // `add set ... { type ipv4_addr; }`: 00 04 02000000.
        let set = SetSpec::set(&[DataType::Ipv4Addr]);
        assert_eq!(set_userdata(&set), [0, 4, 2, 0, 0, 0]);
        // The numgen vmap: integer keys in host order, verdicts.
        let vmap = SetSpec::vmap(&[DataType::Integer]);
        assert_eq!(set_userdata(&vmap), [0, 4, 1, 0, 0, 0, 1, 4, 0, 0, 0, 0]);
    }

    #[test]
    fn elements_are_checked_against_the_spec() {
        let spec = SetSpec::vmap(&[DataType::Ipv4Addr, DataType::InetService]);
        let good = SetElem::verdict(vec![0; 8], Verdict::Accept);
        assert!(spec.check_element(0, &good).is_ok());
        let short = SetElem::verdict(vec![0; 6], Verdict::Accept);
        let err = spec.check_element(3, &short).unwrap_err().to_string();
        assert!(
            err.contains("element 3 key: 6 bytes, the set's key has 8"),
            "{err}"
        );
        let err = spec
            .check_element(0, &SetElem::key(vec![0; 8]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
        let timed = good.clone().with_timeout(Duration::from_secs(1));
        assert!(spec.check_element(0, &timed).is_err());
        let err = SetSpec::set(&[DataType::Ipv4Addr])
            .with_flags(SetFlags::NONE)
            .check();
        assert!(err.is_ok());
        let mut untimed = SetSpec::set(&[DataType::Ipv4Addr]);
        untimed.timeout = Some(Duration::from_secs(3));
        let err = untimed.check().unwrap_err().to_string();
        assert!(err.contains(r#"invalid set timeout "3s""#), "{err}");
        let too_many = SetSpec::set(&[DataType::InetProto; 6]);
        assert!(too_many.check().is_err());
    }

    /// `typeof meta mark . meta mark : meta mark; flags interval`, as nft
    /// stores it.
    fn slots() -> SetSpec {
        let mark = DataType::Mark;
        SetSpec::map(&[mark, mark], &[mark]).with_flags(SetFlags::INTERVAL)
    }

    /// An attribute as netlink lays it out: length, type, value, padding.
    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u16::try_from(4 + value.len()).unwrap().to_ne_bytes());
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    fn nest(ty: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(ty | 0x8000, &parts.concat())
    }

    #[test]
    fn interval_maps_of_concatenations_are_sent_as_nft_sends_them() {
        use wire::*;
        let mut buf = Vec::new();
        wire::put_attrs(&mut buf, |a| encode_set(a, "t", "slots", &slots(), 0, 1));
        // nft --debug=mnl: flags 0x8c (concat, map, interval), and a
        // description of two 4-byte fields, without a size.
        let flags = find_attr(&buf, NFTA_SET_FLAGS).and_then(be32);
        assert_eq!(flags, Some(0x8c));
        let field = nest(NFTA_LIST_ELEM, &[attr(NFTA_SET_FIELD_LEN, &[0, 0, 0, 4])]);
        let concat = nest(NFTA_SET_DESC_CONCAT, &[field.clone(), field.clone()]);
        assert_eq!(find_attr(&buf, NFTA_SET_DESC), Some(&concat[..]));
        // Read back (the kernel's answer carries the same attributes): the
        // spec as it was, the concat flag left out.
        let info = SetInfo::parse(&buf).expect("parsed");
        assert_eq!(info.spec, slots());
        assert_eq!(info.spec.flags.to_string(), "interval");

        // A size goes into the same description, before the fields.
        let mut buf = Vec::new();
        let sized = slots().with_size(100);
        wire::put_attrs(&mut buf, |a| encode_set(a, "t", "slots", &sized, 0, 1));
        let size = attr(NFTA_SET_DESC_SIZE, &100u32.to_be_bytes());
        assert_eq!(
            find_attr(&buf, NFTA_SET_DESC),
            Some(&[size, concat].concat()[..])
        );
        assert_eq!(SetInfo::parse(&buf).expect("parsed").spec, sized);

        // Concatenations without intervals are sent as before.
        let mut buf = Vec::new();
        let plain = SetSpec::map(&[DataType::Mark, DataType::Mark], &[DataType::Mark]);
        wire::put_attrs(&mut buf, |a| encode_set(a, "t", "m", &plain, 0, 1));
        assert_eq!(find_attr(&buf, NFTA_SET_FLAGS).and_then(be32), Some(0x8));
        assert_eq!(find_attr(&buf, NFTA_SET_DESC), None);
    }

    #[test]
    fn range_elements_are_encoded_as_nft_encodes_them() {
        use wire::*;
        let key = concat_interval(&[Datum::Mark(10), Datum::Mark(0)]);
        let end = concat_interval(&[Datum::Mark(10), Datum::Mark(6553)]);
        // nft: `element 0a000000 00000000  - 0a000000 99190000  : 00000000`.
        assert_eq!(key, [0, 0, 0, 10, 0, 0, 0, 0]);
        assert_eq!(end, [0, 0, 0, 10, 0, 0, 0x19, 0x99]);
        let elem = SetElem::range(key.clone(), end.clone()).with_value(vec![0; 4]);
        assert_eq!(
            elem,
            SetElem::mapping(key.clone(), vec![0; 4]).with_end(end.clone())
        );
        let mut buf = Vec::new();
        wire::put_attrs(&mut buf, |list| elem.encode(list));
        // What nft --debug=mnl shows: key, key end, data.
        let want = nest(
            NFTA_LIST_ELEM,
            &[
                nest(NFTA_SET_ELEM_KEY, &[attr(NFTA_DATA_VALUE, &key)]),
                nest(NFTA_SET_ELEM_KEY_END, &[attr(NFTA_DATA_VALUE, &end)]),
                nest(NFTA_SET_ELEM_DATA, &[attr(NFTA_DATA_VALUE, &[0; 4])]),
            ],
        );
        assert_eq!(buf, want);
        assert!(elem.encoded_size_bound() >= buf.len());

        // A dump lists it back with its end.
        let body = nest(NFTA_SET_ELEM_LIST_ELEMENTS, &[buf]);
        let mut listed = Vec::new();
        ElementInfo::parse_list(&body, &mut listed);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key, key);
        assert_eq!(listed[0].key_end.as_deref(), Some(&end[..]));
        assert_eq!(listed[0].value, Some(ElemValue::Data(vec![0; 4])));

        // A key to delete carries the end too.
        let elem_key = ElemKey::from(&listed[0]);
        assert_eq!(elem_key, ElemKey::range(key.clone(), end.clone()));
        assert_eq!(
            elem_key.to_string(),
            "0000000a 00000000 - 0000000a 00001999"
        );
        let mut buf = Vec::new();
        wire::put_attrs(&mut buf, |list| elem_key.encode(list));
        let want = nest(
            NFTA_LIST_ELEM,
            &[
                nest(NFTA_SET_ELEM_KEY, &[attr(NFTA_DATA_VALUE, &key)]),
                nest(NFTA_SET_ELEM_KEY_END, &[attr(NFTA_DATA_VALUE, &end)]),
            ],
        );
        assert_eq!(buf, want);
        assert!(elem_key.encoded_size_bound() >= buf.len());
        assert_eq!(ElemKey::from(key.clone()).to_string(), "0000000a 00000000");
    }

    #[test]
    fn interval_specs_and_ranges_are_checked() {
        let key = |a: u32, b: u32| concat_interval(&[Datum::Mark(a), Datum::Mark(b)]);
        assert!(slots().check().is_ok());
        // One field: the kernel's rbtree, not supported.
        let err = SetSpec::set(&[DataType::InetService])
            .with_flags(SetFlags::INTERVAL)
            .check()
            .unwrap_err()
            .to_string();
        assert!(err.contains("two fields or more"), "{err}");
        // Dynamic: no kernel set type has both.
        let err = slots().with_flags(SetFlags::DYNAMIC).check().unwrap_err();
        assert!(err.to_string().contains("cannot be dynamic"), "{err}");
        assert!(slots().with_timeout(Duration::from_secs(5)).check().is_ok());

        let spec = slots();
        let range = |lo: Vec<u8>, hi: Vec<u8>| SetElem::range(lo, hi).with_value(vec![0; 4]);
        assert!(spec.check_element(0, &range(key(1, 5), key(1, 5))).is_ok());
        assert!(spec.check_element(0, &range(key(1, 0), key(2, 9))).is_ok());
        // Compared as big-endian numbers, field by field.
        let err = spec
            .check_element(4, &range(key(1, 0x100), key(1, 0xff)))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("element 4 key end: field 2 (mark) ends below where it starts"),
            "{err}"
        );
        assert!(spec.check_element(0, &range(key(2, 0), key(1, 9))).is_err());
        let short = range(key(1, 0), vec![0; 4]);
        assert!(short.check(0).is_err());
        let err = spec.check_element(0, &short).unwrap_err().to_string();
        assert!(err.contains("4 bytes, the set's key has 8"), "{err}");
        // No ranges in a set without the flag.
        let plain = SetSpec::map(&[DataType::Mark, DataType::Mark], &[DataType::Mark]);
        let err = plain
            .check_element(0, &range(key(1, 0), key(1, 9)))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no SetFlags::INTERVAL"), "{err}");
        // Keys to delete, likewise.
        assert!(
            ElemKey::range(key(1, 0), key(1, 9))
                .check_against(0, &spec)
                .is_ok()
        );
        assert!(
            ElemKey::range(key(1, 9), key(1, 0))
                .check_against(0, &spec)
                .is_err()
        );
        assert!(
            ElemKey::range(key(1, 0), key(1, 9))
                .check_against(0, &plain)
                .is_err()
        );
        assert!(ElemKey::range(key(1, 0), vec![1]).check(0).is_err());
        assert!(ElemKey::from(vec![0; 4]).check_against(0, &spec).is_err());
    }

    #[test]
    fn interval_keys_put_host_order_fields_in_network_order() {
        let key = concat_interval(&[Datum::Mark(0x0102_0304), Datum::Port(80), Datum::Integer(7)]);
        assert_eq!(key, [1, 2, 3, 4, 0, 80, 0, 0, 0, 0, 0, 7]);
        // Network-order fields are laid out as `concat` lays them out.
        let parts = [Datum::Ipv4("10.0.0.1".parse().unwrap()), Datum::Proto(6)];
        assert_eq!(concat_interval(&parts), concat(&parts));
        assert_eq!(
            SetFlags::from_kernel(wire::NFT_SET_CONCAT | wire::NFT_SET_INTERVAL | 0x8),
            SetFlags::INTERVAL
        );
    }
}
