//! Verdicts: what happens to a packet, or where evaluation goes on. Used by rules
//! ([`super::Expr::Verdict`]) and by verdict maps' elements alike.

use super::wire::{self, Attrs};
use std::fmt;

/// A verdict: what happens to the packet (or where evaluation continues).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    Accept,
    Drop,
    /// Go on with the next rule (what a rule does without a verdict).
    Continue,
    /// Back to the chain that jumped here (for a base chain: its policy).
    Return,
    /// Evaluate a (regular) chain, then come back.
    Jump(String),
    /// Evaluate a (regular) chain instead of the rest of this one.
    Goto(String),
}

impl Verdict {
    fn code(&self) -> i32 {
        match self {
            Verdict::Drop => 0,
            Verdict::Accept => 1,
            Verdict::Continue => -1,
            Verdict::Jump(_) => -3,
            Verdict::Goto(_) => -4,
            Verdict::Return => -5,
        }
    }

    /// Writes `NFTA_DATA_VERDICT` into a data attribute (an immediate's or
    /// a verdict map element's).
    pub(crate) fn encode_data(&self, data: &mut Attrs<'_>) {
        data.nested(wire::NFTA_DATA_VERDICT, |v| {
            v.u32_be(wire::NFTA_VERDICT_CODE, self.code() as u32);
            if let Verdict::Jump(chain) | Verdict::Goto(chain) = self {
                v.str(wire::NFTA_VERDICT_CHAIN, chain);
            }
        });
    }

    /// Reads the inside of an `NFTA_DATA_VERDICT`.
    pub(crate) fn parse(attrs: &[u8]) -> Option<Verdict> {
        let code = wire::find_attr(attrs, wire::NFTA_VERDICT_CODE).and_then(wire::be32)? as i32;
        let chain = || wire::find_attr(attrs, wire::NFTA_VERDICT_CHAIN).map(wire::c_string);
        Some(match code {
            0 => Verdict::Drop,
            1 => Verdict::Accept,
            -1 => Verdict::Continue,
            -3 => Verdict::Jump(chain()?),
            -4 => Verdict::Goto(chain()?),
            -5 => Verdict::Return,
            _ => return None,
        })
    }

    /// A jump or goto needs a chain name the kernel accepts.
    pub(crate) fn check(&self) -> crate::error::Result<()> {
        if let Verdict::Jump(chain) | Verdict::Goto(chain) = self
            && (chain.is_empty() || chain.len() >= wire::NFT_NAME_MAXLEN || chain.contains('\0'))
        {
            return Err(crate::error::Error::invalid(
                "verdict chain",
                chain.as_str(),
                format!("1 to {} bytes, no NUL", wire::NFT_NAME_MAXLEN - 1),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Verdict {
    /// As nft writes it: `accept`, `goto CHAIN`, ...
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Accept => f.write_str("accept"),
            Verdict::Drop => f.write_str("drop"),
            Verdict::Continue => f.write_str("continue"),
            Verdict::Return => f.write_str("return"),
            Verdict::Jump(chain) => write!(f, "jump {chain}"),
            Verdict::Goto(chain) => write!(f, "goto {chain}"),
        }
    }
}
