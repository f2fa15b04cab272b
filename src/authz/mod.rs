//! Who may do what: scopes, purposes, the policy, and the permits that prove
//! a check was made.
//!
//! Default deny. A policy rule grants scopes (`tokenize:<field_type>`,
//! `detokenize:<field_type>`, `*` for every field type) and purposes to the
//! identities its pattern matches. A caller matched by several rules gets
//! the union of their scopes, but a purpose travels with its rule: revealing
//! a value needs one rule that grants both the scope and the purpose. Vault
//! operations take a [`Permit`], which only this module can make, so an
//! unchecked request cannot reach the vault.

use std::{collections::BTreeSet, fmt};

use crate::{identity::ClientId, token::FieldType};

pub mod act;
mod pattern;
mod purpose;
mod scope;

pub use pattern::IdentityPattern;
pub use purpose::{LegalBasis, Purpose, PurposeDeclaration, PurposeError};
pub use scope::{Action, FieldSelector, RevealForm, Scope, ScopeError};

/// Purposes a rule allows: a list, or `*` for any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurposeSet {
    /// Any purpose.
    Any,
    /// Only these.
    Only(BTreeSet<Purpose>),
}

impl PurposeSet {
    /// Whether `purpose` may be stated under this set.
    pub fn allows(&self, purpose: &Purpose) -> bool {
        match self {
            PurposeSet::Any => true,
            PurposeSet::Only(set) => set.contains(purpose),
        }
    }
}

/// One policy entry: who, which scopes, which purposes.
#[derive(Debug, Clone)]
pub struct Rule {
    identity: IdentityPattern,
    scopes: Vec<Scope>,
    purposes: PurposeSet,
}

impl Rule {
    /// Builds a rule from its parsed parts.
    pub fn new(identity: IdentityPattern, scopes: Vec<Scope>, purposes: PurposeSet) -> Self {
        Self {
            identity,
            scopes,
            purposes,
        }
    }

    /// The scopes granted.
    pub fn scopes(&self) -> &[Scope] {
        &self.scopes
    }
}

/// A policy configuration error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A rule has an empty identity pattern.
    #[error("policy rule has an empty identity pattern")]
    EmptyIdentity,
    /// A pattern that does not say which kind of identity it matches.
    #[error(
        "identity pattern {0:?} does not say which kind of identity it matches: write spiffe://... for SPIFFE IDs, dns:{0} for DNS names or cn:{0} for common names"
    )]
    NoIdentityKind(String),
}

/// The whole access policy. Default deny.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<Rule>,
    /// What each declared purpose is for, and on what lawful basis.
    declarations: std::collections::BTreeMap<Purpose, PurposeDeclaration>,
}

/// A purpose for which some identity may reveal a field type, as the
/// policy says (one entry per purpose; `purpose` is `None` for a rule that
/// allows any purpose).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevealPurpose {
    /// The purpose, or `None` for "any purpose the caller states".
    pub purpose: Option<Purpose>,
    /// Its declaration, if the config has one.
    pub declaration: Option<PurposeDeclaration>,
}

impl Policy {
    /// A policy of these rules.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self {
            rules,
            declarations: std::collections::BTreeMap::new(),
        }
    }

    /// The same policy, with what its purposes are for.
    #[must_use]
    pub fn with_declarations(
        mut self,
        declarations: std::collections::BTreeMap<Purpose, PurposeDeclaration>,
    ) -> Self {
        self.declarations = declarations;
        self
    }

    /// Each rule as a config writes it: the identity pattern, the scopes,
    /// and the purposes (`*` for any).
    pub fn describe(&self) -> Vec<(String, Vec<String>, Vec<String>)> {
        self.rules
            .iter()
            .map(|rule| {
                let purposes = match &rule.purposes {
                    PurposeSet::Any => vec!["*".to_owned()],
                    PurposeSet::Only(set) => set.iter().map(ToString::to_string).collect(),
                };
                (
                    rule.identity.to_string(),
                    rule.scopes.iter().map(ToString::to_string).collect(),
                    purposes,
                )
            })
            .collect()
    }

    /// What each declared purpose is for.
    pub fn declarations(&self) -> &std::collections::BTreeMap<Purpose, PurposeDeclaration> {
        &self.declarations
    }

    /// SHA-256 of the rules and declarations as [`Policy::describe`] and
    /// [`Policy::declarations`] give them: equal for equal policies, so the
    /// audit trail can say which policy was in force when.
    pub fn hash(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        hasher.update(b"tokenvault-policy/v1\0");
        // Length-prefixed, so that no two policies hash the same input.
        let mut field = |text: &str| {
            hasher.update((text.len() as u64).to_be_bytes());
            hasher.update(text.as_bytes());
        };
        for (identity, scopes, purposes) in self.describe() {
            field("rule");
            field(&identity);
            for scope in &scopes {
                field(scope);
            }
            field("purposes");
            for purpose in &purposes {
                field(purpose);
            }
        }
        for (purpose, declaration) in &self.declarations {
            field("declaration");
            field(purpose.as_str());
            field(&declaration.description);
            field(declaration.legal_basis.name());
        }
        hasher.finalize().into()
    }

    /// The purposes for which any identity may reveal values of
    /// `field_type` (plain or masked), with their declarations: "why is
    /// this held, and who may see it for what", from the rules in force.
    pub fn reveal_purposes(&self, field_type: &FieldType) -> Vec<RevealPurpose> {
        let mut any = false;
        let mut named = BTreeSet::new();
        for rule in &self.rules {
            let reveals = rule.scopes.iter().any(|s| {
                s.covers(Action::Detokenize, field_type)
                    || s.covers(Action::RevealMasked, field_type)
            });
            if !reveals {
                continue;
            }
            match &rule.purposes {
                PurposeSet::Any => any = true,
                PurposeSet::Only(set) => named.extend(set.iter().cloned()),
            }
        }
        let mut out: Vec<RevealPurpose> = named
            .into_iter()
            .map(|purpose| RevealPurpose {
                declaration: self.declarations.get(&purpose).cloned(),
                purpose: Some(purpose),
            })
            .collect();
        if any {
            out.push(RevealPurpose {
                purpose: None,
                declaration: None,
            });
        }
        out
    }

    /// What `client` may do: the union of every rule that matches it.
    pub fn grants<'a>(&'a self, client: &'a ClientId) -> Grants<'a> {
        let rules = self
            .rules
            .iter()
            .filter(|r| r.identity.matches(client))
            .collect();
        Grants { client, rules }
    }
}

/// The policy in force, replaceable while the server runs (reload on SIGHUP
/// or when the config file changes).
pub type SharedPolicy = crate::shared::Shared<Policy>;

/// The rules that apply to one caller, for the duration of one request.
pub struct Grants<'a> {
    client: &'a ClientId,
    rules: Vec<&'a Rule>,
}

impl Grants<'_> {
    /// Whether any scope grants `action` on any field type: a caller with
    /// none is refused the whole request rather than item by item.
    ///
    /// # Errors
    /// A [`Denial`] naming the action.
    pub fn require_action(&self, action: Action) -> Result<(), Denial> {
        self.require_any(&[action])
    }

    /// Whether any scope grants one of `actions`.
    ///
    /// # Errors
    /// A [`Denial`] naming the first action.
    pub fn require_any(&self, actions: &[Action]) -> Result<(), Denial> {
        let granted = self
            .rules
            .iter()
            .flat_map(|r| &r.scopes)
            .any(|s| actions.contains(&s.action()));
        if granted {
            return Ok(());
        }
        let action = actions.first().copied().unwrap_or(Action::Detokenize);
        Err(self.deny(DenialReason::NoScopeFor(action)))
    }

    /// Checks that some rule lets the caller state `purpose`. This is the
    /// call-level check; what the purpose then unlocks is decided per rule
    /// ([`Grants::permit_reveal`], [`Grants::permit_global_for`]).
    ///
    /// # Errors
    /// A [`Denial`] naming the purpose.
    pub fn allow_purpose(&self, purpose: Purpose) -> Result<PurposeGrant, Denial> {
        let allowed = self.rules.iter().any(|r| r.purposes.allows(&purpose));
        if allowed {
            Ok(PurposeGrant(purpose))
        } else {
            Err(self.deny(DenialReason::Purpose(purpose)))
        }
    }

    /// Permits tokenizing `item` if a scope covers its field type.
    ///
    /// # Errors
    /// A [`Denial`] naming the missing scope.
    pub fn permit_tokenize<T: Tokenizable>(
        &self,
        item: T,
    ) -> Result<Permit<act::Tokenize, T>, Denial> {
        self.check(Action::Tokenize, item.field_type())?;
        Ok(Permit::new(item))
    }

    /// Permits looking up the token of `item` if a scope covers its field type.
    ///
    /// # Errors
    /// A [`Denial`] naming the missing scope.
    pub fn permit_lookup<T: Lookupable>(&self, item: T) -> Result<Permit<act::Lookup, T>, Denial> {
        self.check(Action::Lookup, item.field_type())?;
        Ok(Permit::new(item))
    }

    /// Permits revealing a value of `field_type` for the granted purpose, and
    /// decides its form: plaintext needs `detokenize:<field_type>` (and that
    /// the caller did not ask for the masked form); `reveal_masked` alone only
    /// ever yields the masked form, whatever the caller asked for.
    ///
    /// # Errors
    /// A [`Denial`] naming the missing scope.
    pub fn permit_reveal(
        &self,
        purpose: &PurposeGrant,
        field_type: &FieldType,
        want_masked: bool,
    ) -> Result<Permit<act::Reveal, RevealForm>, Denial> {
        // The scope and the purpose must come from the same rule: one rule's
        // `purposes = ["*"]` never widens another rule's reveal scope.
        let covered_for_purpose = |action| {
            self.rules.iter().any(|r| {
                r.purposes.allows(&purpose.0)
                    && r.scopes.iter().any(|s| s.covers(action, field_type))
            })
        };
        if covered_for_purpose(Action::Detokenize) {
            let form = if want_masked {
                RevealForm::Masked
            } else {
                RevealForm::Plain
            };
            return Ok(Permit::new(form));
        }
        if covered_for_purpose(Action::RevealMasked) {
            return Ok(Permit::new(RevealForm::Masked));
        }
        let needed = Scope::needed(Action::Detokenize, field_type);
        if self.covered(Action::Detokenize, field_type)
            || self.covered(Action::RevealMasked, field_type)
        {
            return Err(self.deny(DenialReason::ScopeNotForPurpose(needed, purpose.0.clone())));
        }
        Err(self.deny(DenialReason::MissingScope(needed)))
    }

    /// Permits a whole-vault action that is done for a purpose (a subject
    /// export) when one rule grants both the action and the purpose.
    ///
    /// # Errors
    /// A [`Denial`] naming the scope, or the purpose it is not granted for.
    pub fn permit_global_for<A: act::GlobalAct, T>(
        &self,
        _action: A,
        purpose: &PurposeGrant,
        item: T,
    ) -> Result<Permit<A, T>, Denial> {
        let action = A::ACTION;
        let granted = |r: &Rule| r.scopes.iter().any(|s| s.action() == action);
        if self
            .rules
            .iter()
            .any(|r| granted(r) && r.purposes.allows(&purpose.0))
        {
            return Ok(Permit::new(item));
        }
        if self.rules.iter().any(|r| granted(r)) {
            let scope = Scope::any_field(action);
            return Err(self.deny(DenialReason::ScopeNotForPurpose(scope, purpose.0.clone())));
        }
        Err(self.deny(DenialReason::NoScopeFor(action)))
    }

    /// Permits a whole-vault action (`subject:export`, `consent:write`...) on
    /// `item`.
    ///
    /// # Errors
    /// A [`Denial`] naming the scope.
    pub fn permit_global<A: act::GlobalAct, T>(
        &self,
        _action: A,
        item: T,
    ) -> Result<Permit<A, T>, Denial> {
        let action = A::ACTION;
        let granted = self
            .rules
            .iter()
            .flat_map(|r| &r.scopes)
            .any(|s| s.action() == action);
        if granted {
            Ok(Permit::new(item))
        } else {
            Err(self.deny(DenialReason::NoScopeFor(action)))
        }
    }

    /// Permits `action` on a value of `field_type` (read from its record).
    ///
    /// # Errors
    /// A [`Denial`] naming the missing scope.
    pub fn permit_field<A: act::FieldAct>(
        &self,
        _action: A,
        field_type: &FieldType,
    ) -> Result<Permit<A, FieldType>, Denial> {
        self.check(A::ACTION, field_type)?;
        Ok(Permit::new(field_type.clone()))
    }

    fn covered(&self, action: Action, field_type: &FieldType) -> bool {
        self.rules
            .iter()
            .flat_map(|r| &r.scopes)
            .any(|s| s.covers(action, field_type))
    }

    fn check(&self, action: Action, field_type: &FieldType) -> Result<(), Denial> {
        if self.covered(action, field_type) {
            Ok(())
        } else {
            Err(self.deny(DenialReason::MissingScope(Scope::needed(
                action, field_type,
            ))))
        }
    }

    fn deny(&self, reason: DenialReason) -> Denial {
        Denial {
            client: self.client.clone(),
            reason,
        }
    }
}

/// Something whose field type decides which scope it needs.
pub trait Guarded {
    /// The field type the scope must cover.
    fn field_type(&self) -> &FieldType;
}

/// An item that `tokenize:` scopes permit (a value to store).
pub trait Tokenizable: Guarded {}

/// An item that `lookup:` scopes permit (a value to find the token of).
pub trait Lookupable: Guarded {}

/// Proof that the policy allowed the action `A` on `T`. Only this module
/// creates permits; each vault operation requires one for its own action.
#[derive(Debug)]
pub struct Permit<A: act::Act, T> {
    item: T,
    action: std::marker::PhantomData<A>,
}

impl<A: act::Act, T> Permit<A, T> {
    fn new(item: T) -> Self {
        Self {
            item,
            action: std::marker::PhantomData,
        }
    }

    /// The permitted item.
    pub fn item(&self) -> &T {
        &self.item
    }

    /// Consumes the permit for its item.
    pub fn into_item(self) -> T {
        self.item
    }
}

/// Proof that the caller may state this purpose.
#[derive(Debug, Clone)]
pub struct PurposeGrant(Purpose);

impl PurposeGrant {
    /// The purpose.
    pub fn purpose(&self) -> &Purpose {
        &self.0
    }
}

/// A refusal. Its message names the identity and what was missing, never a
/// value or a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    client: ClientId,
    reason: DenialReason,
}

/// What a [`Denial`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenialReason {
    /// No scope for this action on this field type.
    MissingScope(Scope),
    /// No scope for this action at all.
    NoScopeFor(Action),
    /// The purpose is not one the caller may state.
    Purpose(Purpose),
    /// The caller holds the scope, but not under a rule that allows this
    /// purpose.
    ScopeNotForPurpose(Scope, Purpose),
}

impl Denial {
    /// Who was refused.
    pub fn client(&self) -> &ClientId {
        &self.client
    }

    /// What was refused.
    pub fn reason(&self) -> &DenialReason {
        &self.reason
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            DenialReason::MissingScope(scope) => {
                write!(f, "identity {} lacks scope {scope}", self.client)
            }
            DenialReason::NoScopeFor(action) => {
                write!(f, "identity {} has no {} scope", self.client, action.name())
            }
            DenialReason::Purpose(purpose) => {
                write!(
                    f,
                    "identity {} may not state purpose {purpose}",
                    self.client
                )
            }
            DenialReason::ScopeNotForPurpose(scope, purpose) => {
                write!(
                    f,
                    "identity {} holds scope {scope}, but not for purpose {purpose}",
                    self.client
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{pattern::glob_match, *};

    fn rule(identity: &str, scopes: &[&str], purposes: &[&str]) -> Rule {
        let purposes = if purposes == ["*"] {
            PurposeSet::Any
        } else {
            PurposeSet::Only(purposes.iter().map(|p| p.parse().unwrap()).collect())
        };
        Rule::new(
            IdentityPattern::new(identity).unwrap(),
            scopes.iter().map(|s| s.parse().unwrap()).collect(),
            purposes,
        )
    }

    fn spiffe(s: &str) -> ClientId {
        ClientId::Spiffe(s.into())
    }

    struct Item(FieldType);
    impl Guarded for Item {
        fn field_type(&self) -> &FieldType {
            &self.0
        }
    }
    impl Tokenizable for Item {}
    impl Lookupable for Item {}

    fn item(ft: &str) -> Item {
        Item(ft.parse().unwrap())
    }

    #[test]
    fn scopes_parse_and_print() {
        for s in [
            "tokenize:email",
            "detokenize:*",
            "detokenize:card_number",
            "reveal_masked:card_number",
            "lookup:email",
            "update:*",
            "delete:email",
            "subject:export",
            "subject:erase",
            "subject:history",
            "consent:read",
            "consent:write",
        ] {
            assert_eq!(s.parse::<Scope>().unwrap().to_string(), s);
        }
        for s in [
            "tokenize",
            "read:email",
            "tokenize:",
            "tokenize:Email",
            ":email",
            "subject:*",
            "consent:email",
        ] {
            assert!(s.parse::<Scope>().is_err(), "{s}");
        }
    }

    /// The denial log line names the scope as a policy writes it.
    #[test]
    fn scope_names_are_the_ones_a_policy_uses() {
        assert_eq!(Action::SubjectErase.scope_name(), "subject:erase");
        assert_eq!(Action::Detokenize.scope_name(), "detokenize:*");
        assert_eq!(Action::RevealMasked.scope_name(), "reveal_masked:*");
        for action in Action::GLOBAL {
            assert!(action.scope_name().parse::<Scope>().is_ok(), "{action:?}");
        }
    }

    #[test]
    fn purposes_parse() {
        assert!("order_fulfilment".parse::<Purpose>().is_ok());
        assert_eq!("".parse::<Purpose>(), Err(PurposeError::Empty));
        assert_eq!("Support".parse::<Purpose>(), Err(PurposeError::Malformed));
        assert_eq!(
            "x".repeat(65).parse::<Purpose>(),
            Err(PurposeError::Malformed)
        );
    }

    #[test]
    fn globs_match() {
        let cases = [
            ("spiffe://a/*", "spiffe://a/x/y", true),
            ("spiffe://a/*", "spiffe://b/x", false),
            ("*.svc", "api.svc", true),
            ("*.svc", "api.svc.evil", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*", "", true),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                want,
                "{pattern} {text}"
            );
        }
    }

    /// A pattern matches identities of its own kind only: the common name
    /// `spiffe://a/x` is not the SPIFFE ID `spiffe://a/x`.
    #[test]
    fn patterns_match_their_own_kind_only() {
        let spiffe_pattern = IdentityPattern::new("spiffe://a/*").unwrap();
        assert!(spiffe_pattern.matches(&spiffe("spiffe://a/x")));
        assert!(!spiffe_pattern.matches(&ClientId::CommonName("spiffe://a/x".into())));
        assert!(!spiffe_pattern.matches(&ClientId::Dns("spiffe://a/x".into())));
        let dns = IdentityPattern::new("dns:*.billing.internal").unwrap();
        assert!(dns.matches(&ClientId::Dns("api.billing.internal".into())));
        assert!(!dns.matches(&ClientId::CommonName("api.billing.internal".into())));
        let cn = IdentityPattern::new("cn:billing").unwrap();
        assert!(cn.matches(&ClientId::CommonName("billing".into())));
        assert!(!cn.matches(&ClientId::Dns("billing".into())));
        assert_eq!(cn.to_string(), "cn:billing");
        for (pattern, error) in [
            (
                "*.billing.internal",
                PolicyError::NoIdentityKind("*.billing.internal".into()),
            ),
            ("*", PolicyError::NoIdentityKind("*".into())),
            ("", PolicyError::EmptyIdentity),
            ("dns:", PolicyError::EmptyIdentity),
        ] {
            assert_eq!(IdentityPattern::new(pattern), Err(error), "{pattern}");
        }
    }

    /// Rule A grants tokenize for any purpose, rule B detokenize for fraud
    /// only: together they must not reveal for any purpose.
    #[test]
    fn a_purpose_unlocks_only_its_own_rules_scopes() {
        let policy = Policy::new(vec![
            rule("spiffe://a/x", &["tokenize:*"], &["*"]),
            rule("spiffe://a/x", &["detokenize:card_number"], &["fraud"]),
            rule(
                "spiffe://a/x",
                &["subject:export"],
                &["subject_access_request"],
            ),
        ]);
        let client = spiffe("spiffe://a/x");
        let grants = policy.grants(&client);
        let card = "card_number".parse().unwrap();
        let marketing = grants.allow_purpose("marketing".parse().unwrap()).unwrap();
        let denial = grants.permit_reveal(&marketing, &card, false).unwrap_err();
        assert_eq!(
            denial.to_string(),
            "identity spiffe://a/x holds scope detokenize:card_number, but not for purpose marketing"
        );
        let fraud = grants.allow_purpose("fraud".parse().unwrap()).unwrap();
        assert!(grants.permit_reveal(&fraud, &card, false).is_ok());
        assert!(
            grants
                .permit_global_for(act::SubjectExport, &marketing, ())
                .is_err()
        );
        let sar = grants
            .allow_purpose("subject_access_request".parse().unwrap())
            .unwrap();
        assert!(
            grants
                .permit_global_for(act::SubjectExport, &sar, ())
                .is_ok()
        );
    }

    #[test]
    fn default_deny() {
        let policy = Policy::default();
        let client = spiffe("spiffe://a/x");
        let grants = policy.grants(&client);
        assert!(grants.permit_tokenize(item("email")).is_err());
        assert!(grants.require_action(Action::Tokenize).is_err());
    }

    #[test]
    fn scopes_are_per_action_and_field_type() {
        let policy = Policy::new(vec![rule(
            "spiffe://a/*",
            &["tokenize:*", "detokenize:email"],
            &["support"],
        )]);
        let client = spiffe("spiffe://a/x");
        let grants = policy.grants(&client);
        assert!(grants.permit_tokenize(item("phone")).is_ok());
        let purpose = grants.allow_purpose("support".parse().unwrap()).unwrap();
        let (email, phone) = ("email".parse().unwrap(), "phone".parse().unwrap());
        assert_eq!(
            grants
                .permit_reveal(&purpose, &email, false)
                .unwrap()
                .into_item(),
            RevealForm::Plain
        );
        assert_eq!(
            grants
                .permit_reveal(&purpose, &email, true)
                .unwrap()
                .into_item(),
            RevealForm::Masked
        );
        let denial = grants.permit_reveal(&purpose, &phone, false).unwrap_err();
        assert_eq!(
            denial.to_string(),
            "identity spiffe://a/x lacks scope detokenize:phone"
        );
        assert!(grants.permit_lookup(item("email")).is_err());
    }

    #[test]
    fn masked_scope_never_yields_plaintext() {
        let policy = Policy::new(vec![rule(
            "spiffe://a/x",
            &["reveal_masked:card_number", "lookup:email"],
            &["*"],
        )]);
        let client = spiffe("spiffe://a/x");
        let grants = policy.grants(&client);
        assert!(
            grants
                .require_any(&[Action::Detokenize, Action::RevealMasked])
                .is_ok()
        );
        assert!(grants.require_action(Action::Detokenize).is_err());
        let purpose = grants.allow_purpose("anything".parse().unwrap()).unwrap();
        let card = "card_number".parse().unwrap();
        for want_masked in [false, true] {
            assert_eq!(
                grants
                    .permit_reveal(&purpose, &card, want_masked)
                    .unwrap()
                    .into_item(),
                RevealForm::Masked
            );
        }
        assert!(
            grants
                .permit_reveal(&purpose, &"email".parse().unwrap(), true)
                .is_err()
        );
        assert!(grants.permit_lookup(item("email")).is_ok());
        assert!(grants.permit_tokenize(item("email")).is_err());
    }

    #[test]
    fn purposes_are_checked_and_rules_union() {
        let policy = Policy::new(vec![
            rule("spiffe://a/x", &["detokenize:email"], &["support"]),
            rule("spiffe://a/*", &["tokenize:email"], &["billing"]),
        ]);
        let client = spiffe("spiffe://a/x");
        let grants = policy.grants(&client);
        assert!(grants.allow_purpose("support".parse().unwrap()).is_ok());
        assert!(grants.allow_purpose("billing".parse().unwrap()).is_ok());
        let denial = grants
            .allow_purpose("marketing".parse().unwrap())
            .unwrap_err();
        assert_eq!(
            denial.to_string(),
            "identity spiffe://a/x may not state purpose marketing"
        );
        let other = spiffe("spiffe://a/y");
        let other_grants = policy.grants(&other);
        assert!(other_grants.require_action(Action::Detokenize).is_err());
        assert!(
            other_grants
                .allow_purpose("support".parse().unwrap())
                .is_err()
        );
    }

    #[test]
    fn the_purposes_a_field_type_is_revealed_for_come_from_the_rules_that_reveal_it() {
        let declaration = |basis| PurposeDeclaration {
            description: "Answering the customer".into(),
            legal_basis: basis,
        };
        let policy = Policy::new(vec![
            rule("spiffe://a/support", &["detokenize:email"], &["support"]),
            rule("spiffe://a/ship", &["reveal_masked:*"], &["shipping"]),
            // Tokenize only: says nothing about why a value is revealed.
            rule("spiffe://a/shop", &["tokenize:*"], &["checkout"]),
            rule("spiffe://a/ops", &["detokenize:phone"], &["*"]),
        ])
        .with_declarations(
            [(
                "support".parse().unwrap(),
                declaration(LegalBasis::Contract),
            )]
            .into(),
        );
        let email: FieldType = "email".parse().unwrap();
        let found = policy.reveal_purposes(&email);
        let names: Vec<Option<&str>> = found
            .iter()
            .map(|p| p.purpose.as_ref().map(Purpose::as_str))
            .collect();
        assert_eq!(names, [Some("shipping"), Some("support")]);
        assert_eq!(found[0].declaration, None);
        assert_eq!(
            found[1].declaration.as_ref().unwrap().legal_basis,
            LegalBasis::Contract
        );
        let phone: FieldType = "phone".parse().unwrap();
        let names: Vec<Option<String>> = policy
            .reveal_purposes(&phone)
            .into_iter()
            .map(|p| p.purpose.map(|p| p.to_string()))
            .collect();
        assert_eq!(names, [Some("shipping".to_owned()), None]);
    }

    #[test]
    fn legal_bases_parse_by_their_names_only() {
        for basis in LegalBasis::ALL {
            assert_eq!(basis.name().parse::<LegalBasis>().unwrap(), basis);
        }
        let err = "consented".parse::<LegalBasis>().unwrap_err();
        assert!(err.contains("legitimate_interests"), "{err}");
    }
}
