//! `tokenvault subjects`: the requester's side of a sealed export, offline.
//! `keygen` makes the X25519 key pair an export is sealed to;
//! `open-export` opens what `ExportSubject` streamed (grpcurl's JSON output,
//! as saved from the dev examples) with the private key.

use std::{
    io::{Read, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Subcommand;
use data_encoding::BASE64;
use prost::Message;
use zeroize::Zeroizing;

use crate::{
    crypto::{EXPORT_KEY_LEN, ExportOpener, export_keypair},
    proto::v1 as pb,
};

#[derive(Debug, Subcommand)]
pub(super) enum SubjectsCommand {
    /// Make a key pair to receive sealed exports: export.key (private, mode
    /// 0600) and export.pub (public), both one line of base64. Give the
    /// public key as ExportSubject's recipient_public_key.
    Keygen {
        /// Where to write export.key and export.pub (never overwritten).
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// Open a sealed export (the JSON messages grpcurl prints for
    /// ExportSubject, or a file of them) with the private key; prints one
    /// JSON line per value.
    OpenExport {
        /// The private key (export.key from `keygen`).
        #[arg(long)]
        key: PathBuf,
        /// The vault's audit public key (hex, `tokenvault audit public-key`,
        /// obtained from the vault's operator, not from whoever relays the
        /// export): the export must be signed with it.
        #[arg(long)]
        vault_key: String,
        /// The subject id the export must be of (yours, or the one you act
        /// for): an export of another subject is refused.
        #[arg(long)]
        subject: String,
        /// The request id the export must come from, if known: an older
        /// export replayed has another.
        #[arg(long)]
        request_id: Option<String>,
        /// The export must have been made at or after this time (RFC 3339,
        /// e.g. when you asked): an older one replayed is refused. A new key
        /// pair per request (`keygen`) also keeps old exports from opening.
        #[arg(long)]
        not_before: Option<String>,
        /// The saved export; standard input if absent.
        #[arg(long = "in")]
        input: Option<PathBuf>,
    },
}

pub(super) fn run(command: SubjectsCommand) -> Result<ExitCode, String> {
    match command {
        SubjectsCommand::Keygen { out_dir } => {
            let (private, public) = export_keypair().map_err(|e| e.to_string())?;
            std::fs::create_dir_all(&out_dir)
                .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
            let private_text = Zeroizing::new(format!("{}\n", BASE64.encode(private.as_ref())));
            super::write_new_file(&out_dir.join("export.key"), &private_text, 0o600)?;
            let public_text = BASE64.encode(&public);
            super::write_new_file(
                &out_dir.join("export.pub"),
                &format!("{public_text}\n"),
                0o644,
            )?;
            println!("{public_text}");
            eprintln!(
                "wrote {0}/export.key (keep it private) and {0}/export.pub; ask for the export with recipient_public_key = the line above",
                out_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        SubjectsCommand::OpenExport {
            key,
            vault_key,
            subject,
            request_id,
            not_before,
            input,
        } => {
            let private = read_private_key(&key)?;
            let not_before_ms = not_before
                .map(|text| {
                    time::OffsetDateTime::parse(
                        &text,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .map(|t| u64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
                    .map_err(|e| format!("--not-before: {e}"))
                })
                .transpose()?;
            let expected = Expected {
                vault_key: super::audit::parse_public_key(&vault_key)
                    .map_err(|e| e.replace("--public-key", "--vault-key"))?,
                subject,
                request_id,
                not_before_ms,
            };
            let mut text = Zeroizing::new(Vec::new());
            match &input {
                Some(path) => {
                    *text = std::fs::read(path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                }
                None => {
                    std::io::stdin()
                        .read_to_end(&mut text)
                        .map_err(|e| format!("cannot read standard input: {e}"))?;
                }
            }
            let (fields, signed) = open_export(&private, &text, &expected)?;
            let when = time::OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(signed.exported_ms) * 1_000_000,
            )
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
            eprintln!(
                "signed by the vault: request {}, made {when}, subject checked",
                signed.request_id
            );
            let mut out = std::io::stdout().lock();
            for field in &fields {
                let line = Zeroizing::new(
                    serde_json::json!({
                        "token": field.token,
                        "field_type": field.field_type,
                        "value": field.value,
                        "created_ms": field.created_ms,
                        "expires_ms": field.expires_ms,
                        "purposes": field.purposes.iter().map(|p| serde_json::json!({
                            "purpose": p.purpose,
                            "description": p.description,
                            "legal_basis": p.legal_basis,
                            "needs_consent": p.needs_consent,
                        })).collect::<Vec<_>>(),
                    })
                    .to_string(),
                );
                writeln!(out, "{}", line.as_str()).map_err(|e| e.to_string())?;
            }
            eprintln!("opened a sealed export of {} values", fields.len());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What an opened export must be: signed with the vault's key, and of the
/// subject and request given.
pub(crate) struct Expected {
    pub(crate) vault_key: [u8; 32],
    pub(crate) subject: String,
    pub(crate) request_id: Option<String>,
    /// The earliest time it may have been made, ms since the epoch.
    pub(crate) not_before_ms: Option<u64>,
}

/// What the vault's signature says of an opened export.
pub(crate) struct Signed {
    pub(crate) request_id: String,
    pub(crate) exported_ms: u64,
}

/// The fields of a sealed export given as grpcurl's stream of JSON messages
/// (`sealed` and, in the first, `encapsulatedKey`, both base64), once the
/// vault's signature over it verifies and it is of what `expected` names.
///
/// # Errors
/// A wrong key, a changed, reordered, missing or extra record, a signature
/// that is not the vault's (a substituted or fabricated export), another
/// subject or request than expected, or input that is not such a stream;
/// the message says which.
pub(crate) fn open_export(
    private: &[u8; EXPORT_KEY_LEN],
    text: &[u8],
    expected: &Expected,
) -> Result<(Vec<pb::SubjectField>, Signed), String> {
    let mut opener: Option<(ExportOpener, Vec<u8>)> = None;
    let mut fields = Vec::new();
    let mut ciphertexts = Vec::new();
    let mut signed = None;
    for message in serde_json::Deserializer::from_slice(text).into_iter::<serde_json::Value>() {
        let message = message.map_err(|e| format!("not a stream of JSON messages: {e}"))?;
        let bytes = |names: [&str; 2]| -> Result<Option<Vec<u8>>, String> {
            names
                .iter()
                .find_map(|name| message.get(*name).and_then(serde_json::Value::as_str))
                .map(|b64| {
                    BASE64
                        .decode(b64.as_bytes())
                        .map_err(|_| format!("{} is not base64", names[0]))
                })
                .transpose()
        };
        if signed.is_some() {
            return Err("there is more after the export's end record".into());
        }
        if opener.is_none() {
            let encapsulated = bytes(["encapsulatedKey", "encapsulated_key"])?.ok_or(
                "the first message has no encapsulatedKey: is this a sealed export (asked with recipient_public_key)?",
            )?;
            let opened = ExportOpener::new(private, &encapsulated)
                .map_err(|_| "the export does not open with this key".to_owned())?;
            opener = Some((opened, encapsulated));
        }
        let Some((opener, encapsulated)) = opener.as_mut() else {
            unreachable!("set above")
        };
        let sealed = bytes(["sealed", "sealed"])?.ok_or("a message has no sealed record")?;
        let plain = opener.open(&sealed).map_err(|_| {
            if fields.is_empty() {
                "the export does not open with this key".to_owned()
            } else {
                format!("record {} was changed or is out of order", fields.len())
            }
        })?;
        let record = pb::SealedRecord::decode(plain.as_slice())
            .map_err(|_| "a record does not decode".to_owned())?;
        if record.end {
            if record.total != fields.len() as u64 {
                return Err(format!(
                    "the end record says {} values, {} came before it",
                    record.total,
                    fields.len()
                ));
            }
            signed = Some(check_end(&record, encapsulated, &ciphertexts, expected)?);
            continue;
        }
        if record.index != fields.len() as u64 {
            return Err(format!(
                "record {} came where record {} belongs",
                record.index,
                fields.len()
            ));
        }
        let mut record = record;
        fields.push(record.field.take().ok_or("a record holds no value")?);
        ciphertexts.push(sealed);
    }
    let Some(signed) = signed else {
        return Err(format!(
            "the export is cut off: {} values and no end record",
            fields.len()
        ));
    };
    Ok((fields, signed))
}

/// Checks the end record's signature over the export, then that it is of
/// the subject and request expected.
fn check_end(
    end: &pb::SealedRecord,
    encapsulated: &[u8],
    ciphertexts: &[Vec<u8>],
    expected: &Expected,
) -> Result<Signed, String> {
    let statement = crate::crypto::ExportStatement {
        encapsulated,
        records: ciphertexts,
        subject_digest: &end.subject_digest,
        request_id: &end.request_id,
        exported_ms: end.exported_ms,
    };
    let verified = <[u8; 64]>::try_from(end.signature.as_slice()).is_ok_and(|signature| {
        crate::crypto::verify_signature(&expected.vault_key, &statement.message(), &signature)
    });
    if !verified {
        return Err(
            "the export is not signed with the vault's key: it was substituted or made by someone else (or --vault-key is another vault's)"
                .to_owned(),
        );
    }
    if crate::crypto::subject_digest(&expected.subject).as_slice() != end.subject_digest.as_slice()
    {
        return Err("the export is of another subject than --subject".to_owned());
    }
    if let Some(not_before) = expected.not_before_ms
        && end.exported_ms < not_before
    {
        return Err(
            "the export was made before --not-before (an older export replayed?)".to_owned(),
        );
    }
    if let Some(request_id) = &expected.request_id
        && *request_id != end.request_id
    {
        return Err(format!(
            "the export comes from request {}, not {request_id} (an older export replayed?)",
            end.request_id
        ));
    }
    Ok(Signed {
        request_id: end.request_id.clone(),
        exported_ms: end.exported_ms,
    })
}

fn read_private_key(path: &Path) -> Result<Zeroizing<[u8; EXPORT_KEY_LEN]>, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
    );
    let bytes = Zeroizing::new(
        BASE64
            .decode(text.trim().as_bytes())
            .map_err(|_| format!("{} is not a key from `subjects keygen`", path.display()))?,
    );
    let mut key = Zeroizing::new([0u8; EXPORT_KEY_LEN]);
    if bytes.len() != EXPORT_KEY_LEN {
        return Err(format!(
            "{} is not a key from `subjects keygen`",
            path.display()
        ));
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}
