//! The actions a permit proves, as types. A vault operation names the one
//! it needs (`Permit<act::Update, FieldType>`), so a permit the policy gave
//! for another action, on the same kind of item, does not type-check in
//! its place: "no vault operation without a permit for it" is checked by
//! the compiler, not by reviewers.
//!
//! An update takes an update permit:
//!
//! ```
//! use tokenvault::{authz::{Permit, act}, token::FieldType};
//!
//! fn update(_: Permit<act::Update, FieldType>) {}
//! fn granted() -> Permit<act::Update, FieldType> {
//!     unimplemented!()
//! }
//! let _ = || update(granted());
//! ```
//!
//! and not the lookup permit for the same field type:
//!
//! ```compile_fail,E0308
//! use tokenvault::{authz::{Permit, act}, token::FieldType};
//!
//! fn update(_: Permit<act::Update, FieldType>) {}
//! fn granted() -> Permit<act::Lookup, FieldType> {
//!     unimplemented!()
//! }
//! let _ = || update(granted());
//! ```
//!
//! The vault's operations take them so: an erasure takes a `subject:erase`
//! permit,
//!
//! ```
//! use tokenvault::{
//!     audit::AuditContext,
//!     authz::{Permit, act},
//!     store::AnyStore,
//!     vault::{SubjectId, Vault},
//! };
//!
//! async fn erase(
//!     vault: &Vault<AnyStore>,
//!     permit: Permit<act::SubjectErase, SubjectId>,
//!     audit: &AuditContext,
//! ) {
//!     let _ = vault.erase_subject(permit, audit, None).await;
//! }
//! ```
//!
//! and not the export permit for the same subject:
//!
//! ```compile_fail,E0308
//! use tokenvault::{
//!     audit::AuditContext,
//!     authz::{Permit, act},
//!     store::AnyStore,
//!     vault::{SubjectId, Vault},
//! };
//!
//! async fn erase(
//!     vault: &Vault<AnyStore>,
//!     permit: Permit<act::SubjectExport, SubjectId>,
//!     audit: &AuditContext,
//! ) {
//!     let _ = vault.erase_subject(permit, audit, None).await;
//! }
//! ```
//!
//! A key rotation needs `admin:keys`; a whole-vault permit for another
//! action, on the same `()`, is refused:
//!
//! ```compile_fail,E0308
//! use tokenvault::authz::{Permit, act};
//!
//! fn rotate(_: Permit<act::AdminKeys, ()>) {}
//! fn granted() -> Permit<act::SubjectExport, ()> {
//!     unimplemented!()
//! }
//! let _ = || rotate(granted());
//! ```
//!
//! A deletion permit does not pass for an update (both on a field type):
//!
//! ```compile_fail,E0308
//! use tokenvault::{authz::{Permit, act}, token::FieldType};
//!
//! fn update(_: Permit<act::Update, FieldType>) {}
//! fn granted() -> Permit<act::Delete, FieldType> {
//!     unimplemented!()
//! }
//! let _ = || update(granted());
//! ```
//!
//! And a field action cannot be asked for as a whole-vault one (no scope
//! without a field type makes an update permit), though a whole-vault
//! action can:
//!
//! ```
//! use tokenvault::authz::{Grants, act};
//!
//! fn ask(grants: &Grants) {
//!     let _ = grants.permit_global(act::AdminKeys, ());
//! }
//! ```
//!
//! ```compile_fail,E0277
//! use tokenvault::authz::{Grants, act};
//!
//! fn ask(grants: &Grants) {
//!     let _ = grants.permit_global(act::Update, ());
//! }
//! ```

use super::Action;

/// An action a permit can prove. Sealed: only this module names them.
pub trait Act: sealed::Sealed {}

/// An action on values of one field type, granted by `action:<field_type>`
/// scopes ([`super::Grants::permit_field`]).
pub trait FieldAct: Act {
    /// The action the policy checks.
    const ACTION: Action;
}

/// A whole-vault action, granted by a scope without a field type
/// ([`super::Grants::permit_global`]).
pub trait GlobalAct: Act {
    /// The action the policy checks.
    const ACTION: Action;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! acts {
    ($kind:ident: $($name:ident),* $(,)?) => {
        $(
            #[doc = concat!("[`Action::", stringify!($name), "`], as a type.")]
            #[derive(Debug, Clone, Copy)]
            pub struct $name;

            impl sealed::Sealed for $name {}

            impl Act for $name {}

            impl $kind for $name {
                const ACTION: Action = Action::$name;
            }
        )*
    };
}

acts!(FieldAct: Tokenize, Lookup, Update, Delete);
acts!(GlobalAct:
    SubjectExport,
    SubjectErase,
    SubjectHistory,
    ConsentRead,
    ConsentWrite,
    AdminBackup,
    AuditRead,
    AdminKeys,
);

/// Revealing a value: with `detokenize:` (plain or masked) or
/// `reveal_masked:` ([`super::Grants::permit_reveal`], which decides the
/// form).
#[derive(Debug, Clone, Copy)]
pub struct Reveal;

impl sealed::Sealed for Reveal {}

impl Act for Reveal {}
