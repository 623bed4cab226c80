//! A table as Trellis writes it: sets with their elements, chains with their rules. Every
//! rule carries a comment `trellis:<fingerprint>`, a hash of its expressions, so the audit
//! can tell our rules from anyone else's (and an old version's) without decoding every
//! expression the kernel dumps.

use std::collections::BTreeMap;
use trellis_dataplane::nftables::{BaseChain, CmpOp, ElemValue, Expr, MetaKey, SetFlags, SetSpec};

/// A rule as Trellis writes it.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedRule {
    pub exprs: Vec<Expr>,
    /// `trellis:<fingerprint>`.
    pub comment: String,
}

impl RenderedRule {
    pub fn new(mut exprs: Vec<Expr>) -> RenderedRule {
        strip_family_checks(&mut exprs);
        let comment = format!("trellis:{:016x}", fingerprint(&exprs));
        RenderedRule { exprs, comment }
    }

    /// A rule whose comment also says, for someone reading `nft list`, why it is there.
    /// The note is cut to fit nft's limit on comments.
    pub fn noted(exprs: Vec<Expr>, note: &str) -> RenderedRule {
        let mut rule = RenderedRule::new(exprs);
        rule.comment.push(' ');
        rule.comment.push_str(note);
        let mut end = rule.comment.len().min(MAX_COMMENT);
        while !rule.comment.is_char_boundary(end) {
            end -= 1;
        }
        rule.comment.truncate(end);
        rule
    }
}

/// The longest comment nft stores for a rule (`Batch::add_rule`).
const MAX_COMMENT: usize = 128;

/// A chain as Trellis writes it.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedChain {
    pub base: Option<BaseChain>,
    pub rules: Vec<RenderedRule>,
}

/// A set or map as Trellis writes it. Elements are compared only for sets Trellis
/// fills (`dynamic` sets, like the proxy's affinity sets, belong to the packet path).
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedSet {
    pub spec: SetSpec,
    pub elements: BTreeMap<Vec<u8>, Option<ElemValue>>,
}

impl RenderedSet {
    pub fn empty(spec: SetSpec) -> RenderedSet {
        RenderedSet {
            spec,
            elements: BTreeMap::new(),
        }
    }

    /// Whether the packet path writes its elements (the reconciler leaves them alone).
    pub fn is_dynamic(&self) -> bool {
        self.spec.flags.contains(SetFlags::DYNAMIC)
    }
}

/// One family's table as Trellis writes it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RenderedTable {
    pub sets: BTreeMap<String, RenderedSet>,
    pub chains: BTreeMap<String, RenderedChain>,
}

/// Removes `meta nfproto` checks: the dsl adds them before address matches so that its
/// fragments work in `inet` tables, but in an `ip` or `ip6` table they are always true,
/// and nft (1.0.6) aborts listing a rule that has one there.
fn strip_family_checks(exprs: &mut Vec<Expr>) {
    let mut i = 0;
    while i + 1 < exprs.len() {
        let is_check = matches!(
            (&exprs[i], &exprs[i + 1]),
            (Expr::Meta { key: MetaKey::NfProto, dreg }, Expr::Cmp { sreg, op: CmpOp::Eq, .. })
                if dreg == sreg
        );
        if is_check {
            exprs.drain(i..i + 2);
        } else {
            i += 1;
        }
    }
}

/// FNV-1a over the expressions' debug form: stable for a given build, which is all the
/// comment needs (a new build that renders a rule differently rewrites it once). The debug
/// form is hashed as it is written, never held as a string: a table of 10,000 services
/// has 300,000 rules.
fn fingerprint(exprs: &[Expr]) -> u64 {
    use std::fmt::Write;
    let mut hash = Fnv::new();
    let _ = write!(hash, "{exprs:?}");
    hash.0
}

/// FNV-1a: names and fingerprints that must be the same from one run to the next (std's
/// hasher is seeded per process).
pub struct Fnv(pub u64);

impl Fnv {
    pub fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl Default for Fnv {
    fn default() -> Fnv {
        Fnv::new()
    }
}

impl std::fmt::Write for Fnv {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        self.write(text.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_fnv1a_of_the_rules_debug_form() {
        let exprs = trellis_dataplane::nftables::dsl::goto("service-ns/web/tcp/p");
        let text = format!("{exprs:?}");
        let expected = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        assert_eq!(fingerprint(&exprs), expected);
        assert_ne!(
            fingerprint(&exprs),
            fingerprint(&trellis_dataplane::nftables::dsl::goto("other"))
        );
    }
}
