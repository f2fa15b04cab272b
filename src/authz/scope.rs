//! Scopes: an action and the field types it applies to (`detokenize:email`,
//! `subject:erase`).

use std::{fmt, str::FromStr};

use crate::token::FieldType;

/// An operation a scope grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    /// Store values and get tokens.
    Tokenize,
    /// Read values back from tokens, in plaintext (or masked, on request).
    Detokenize,
    /// Read only the masked form of values.
    RevealMasked,
    /// Find the token of a value of a deterministic field type.
    Lookup,
    /// Replace the value behind a token (rectification).
    Update,
    /// Delete single tokens.
    Delete,
    /// Export all values of a data subject (`subject:export`).
    SubjectExport,
    /// Erase a data subject (`subject:erase`).
    SubjectErase,
    /// Read a data subject's access history (`subject:history`).
    SubjectHistory,
    /// Read consent decisions (`consent:read`).
    ConsentRead,
    /// Record consent decisions (`consent:write`).
    ConsentWrite,
    /// Take online backups (`admin:backup`).
    AdminBackup,
    /// Read the audit trail (`audit:read`).
    AuditRead,
    /// Rotate keys (`admin:keys`).
    AdminKeys,
}

impl Action {
    /// Actions granted per field type (`<action>:<field type>` or `:*`).
    pub const PER_FIELD: [Action; 6] = [
        Action::Tokenize,
        Action::Detokenize,
        Action::RevealMasked,
        Action::Lookup,
        Action::Update,
        Action::Delete,
    ];

    /// Actions granted whole: the scope is the action's name itself.
    pub const GLOBAL: [Action; 8] = [
        Action::SubjectExport,
        Action::SubjectErase,
        Action::SubjectHistory,
        Action::ConsentRead,
        Action::ConsentWrite,
        Action::AdminBackup,
        Action::AuditRead,
        Action::AdminKeys,
    ];

    /// The name scopes use.
    pub fn name(self) -> &'static str {
        match self {
            Action::Tokenize => "tokenize",
            Action::Detokenize => "detokenize",
            Action::RevealMasked => "reveal_masked",
            Action::Lookup => "lookup",
            Action::Update => "update",
            Action::Delete => "delete",
            Action::SubjectExport => "subject:export",
            Action::SubjectErase => "subject:erase",
            Action::SubjectHistory => "subject:history",
            Action::ConsentRead => "consent:read",
            Action::ConsentWrite => "consent:write",
            Action::AdminBackup => "admin:backup",
            Action::AuditRead => "audit:read",
            Action::AdminKeys => "admin:keys",
        }
    }

    fn is_global(self) -> bool {
        Self::GLOBAL.contains(&self)
    }

    /// The scope that grants this action on everything: `subject:erase`
    /// for a global action, `detokenize:*` for a per-field one.
    pub fn scope_name(self) -> String {
        if self.is_global() {
            self.name().to_owned()
        } else {
            format!("{}:*", self.name())
        }
    }
}

/// The form a value is revealed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevealForm {
    /// The value itself.
    Plain,
    /// The value with most of it hidden, by the field type's mask rule.
    Masked,
}

impl RevealForm {
    /// The name audit events record (never rename a released one).
    pub fn name(self) -> &'static str {
        match self {
            RevealForm::Plain => "plain",
            RevealForm::Masked => "masked",
        }
    }
}

/// Which field types a scope covers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FieldSelector {
    /// `*`: every field type.
    Any,
    /// One field type.
    One(FieldType),
}

/// A grant of one action on some field types: `tokenize:email`, `detokenize:*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    action: Action,
    fields: FieldSelector,
}

impl Scope {
    /// The scope that `action` on `field_type` needs.
    pub fn needed(action: Action, field_type: &FieldType) -> Self {
        Self {
            action,
            fields: FieldSelector::One(field_type.clone()),
        }
    }

    /// `action` on every field type (`action:*`).
    pub fn any_field(action: Action) -> Self {
        Self {
            action,
            fields: FieldSelector::Any,
        }
    }

    /// The action granted.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The field types covered.
    pub fn fields(&self) -> &FieldSelector {
        &self.fields
    }

    pub(super) fn covers(&self, action: Action, field_type: &FieldType) -> bool {
        self.action == action
            && match &self.fields {
                FieldSelector::Any => true,
                FieldSelector::One(ft) => ft == field_type,
            }
    }
}

/// Why a string is not a scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid scope {0:?}: expected tokenize:, detokenize:, reveal_masked:, lookup:, update: or delete: followed by a field type or *, or one of subject:export, subject:erase, subject:history, consent:read, consent:write, admin:backup, admin:keys, audit:read"
)]
pub struct ScopeError(String);

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ScopeError(s.to_owned());
        if let Some(action) = Action::GLOBAL.into_iter().find(|a| a.name() == s) {
            return Ok(Self {
                action,
                fields: FieldSelector::Any,
            });
        }
        let (action, fields) = s.split_once(':').ok_or_else(err)?;
        let action = Action::PER_FIELD
            .into_iter()
            .find(|a| a.name() == action)
            .ok_or_else(err)?;
        let fields = match fields {
            "*" => FieldSelector::Any,
            name => FieldSelector::One(name.parse().map_err(|_| err())?),
        };
        Ok(Self { action, fields })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fields {
            _ if self.action.is_global() => f.write_str(self.action.name()),
            FieldSelector::Any => write!(f, "{}:*", self.action.name()),
            FieldSelector::One(ft) => write!(f, "{}:{ft}", self.action.name()),
        }
    }
}
