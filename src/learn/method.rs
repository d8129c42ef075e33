//! The learning method (`learn.method`): which phases run, which variables each trains and which
//! attention loss it adds. MIFO and its baselines share one training loop (the
//! [`super::learner`]); a method only chooses among its parts. The numbers (steps, rates, λ,
//! layers) stay keys of [`super::LearnConfig`]; each method's published values are the preset of
//! the same name (`docs/mifo-impl-notes.md` §3.6).

use super::Phase;

/// A learning method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LearnMethod {
    /// MIFO (paper Algorithm 1): tokens with the attention reward (A.1) then penalty (A.2), then
    /// DreamBooth of tokens and weights (B) with its optional penalty.
    Mifo,
    /// Break-a-Scene (Avrahami et al. 2023, `google/break-a-scene`): tokens only (phase A), then
    /// tokens and weights (phase B), both with its cross-attention loss: the head- and
    /// layer-mean map of each token divided by its maximum, against the token's mask
    /// (nearest-downsampled), by mean squared error.
    BreakAScene,
    /// TI-m (the MIFO paper's textual-inversion baseline, Sec. 4.2): the placeholder rows only,
    /// masked loss, no attention loss, no phase B.
    TiM,
    /// DB-m (the MIFO paper's DreamBooth baseline, Sec. 4.2): tokens and weights together from
    /// the first step (phase B only), masked loss, no attention loss.
    DbM,
}

/// The attention loss a method adds in a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnLoss {
    /// MIFO's reward ‖α·M − A‖² (Eq. 1).
    Reward,
    /// MIFO's penalty ‖(1 − M) ⊙ A‖² (Eq. 2).
    Penalty,
    /// Break-a-Scene's loss ([`super::losses::bas_attn_loss`]).
    BreakAScene,
}

/// Every method's name, in the order the CLI lists them.
pub const METHOD_NAMES: [&str; 4] = ["mifo", "break-a-scene", "ti-m", "db-m"];

impl LearnMethod {
    /// `mifo`, `break-a-scene`, `ti-m` or `db-m`; anything else is `None`.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "mifo" => Some(Self::Mifo),
            "break-a-scene" => Some(Self::BreakAScene),
            "ti-m" => Some(Self::TiM),
            "db-m" => Some(Self::DbM),
            _ => None,
        }
    }

    /// The method's `learn.method` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mifo => "mifo",
            Self::BreakAScene => "break-a-scene",
            Self::TiM => "ti-m",
            Self::DbM => "db-m",
        }
    }

    /// Whether phase A (tokens only: `reward_steps` + `penalty_steps`) runs.
    pub fn has_token_phase(self) -> bool {
        self != Self::DbM
    }

    /// Whether phase B (tokens and the UNet / text-encoder weights: `dreambooth_steps`) runs.
    pub fn has_weight_phase(self) -> bool {
        self != Self::TiM
    }

    /// The attention loss of `phase`, if the method has one there (its weight may still be 0).
    pub fn attention_loss(self, phase: Phase) -> Option<AttnLoss> {
        match (self, phase) {
            (Self::Mifo, Phase::Reward) => Some(AttnLoss::Reward),
            (Self::Mifo, _) => Some(AttnLoss::Penalty),
            (Self::BreakAScene, _) => Some(AttnLoss::BreakAScene),
            (Self::TiM | Self::DbM, _) => None,
        }
    }
}
