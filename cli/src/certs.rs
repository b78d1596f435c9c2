//! `chaosctl certs`: a small CA, server certificates for chaosd's TLS port
//! (one per host, with its names and addresses) and client certificates,
//! made with rcgen so that nobody needs an openssl recipe. Keys are ECDSA
//! P-256, written 0600; nothing is overwritten without `--force`.

use std::{
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::client::CliError;

#[derive(Subcommand)]
pub enum CertsCommand {
    /// Make a CA: DIR/ca.pem (give it to chaosd as --tls-client-ca and to
    /// chaosctl as --ca) and DIR/ca.key (keep it safe; it signs the others).
    Ca {
        /// Directory to write into (created 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "chaosd CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Make a certificate for one chaosd host (`chaosd serve --tls-cert
    /// OUT/NAME.pem --tls-key OUT/NAME.key`), valid for its names and
    /// addresses: clients must connect by one of them.
    Server(LeafArgs),
    /// Make a client certificate for chaosctl (`--cert OUT/NAME.pem --key
    /// OUT/NAME.key`); NAME is its subject, as `--tls-allow-subject` names it.
    Client(LeafArgs),
}

#[derive(Args)]
pub struct LeafArgs {
    /// Directory of the CA (ca.pem and ca.key, from `chaosctl certs ca`).
    #[arg(long, value_name = "DIR")]
    ca: PathBuf,
    /// Subject (common name) and file name; for a server also its DNS name.
    /// Repeat for more DNS names (the first names the files).
    #[arg(long, required = true)]
    name: Vec<String>,
    /// An IP address the server is reached at (repeatable).
    #[arg(long = "addr", value_name = "IP")]
    addrs: Vec<IpAddr>,
    /// Directory to write into (default: the CA's).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Validity in days from now.
    #[arg(long, default_value_t = 365, conflicts_with = "not_after")]
    days: u32,
    /// Last day of validity instead (YYYY-MM-DD); a date in the past makes
    /// an expired certificate, to check that it is refused.
    #[arg(long, value_name = "DATE", value_parser = parse_date)]
    not_after: Option<OffsetDateTime>,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

fn parse_date(s: &str) -> Result<OffsetDateTime, String> {
    let bad = || format!("'{s}' is not a date: write YYYY-MM-DD");
    let mut it = s.splitn(3, '-');
    let (Some(y), Some(m), Some(d)) = (it.next(), it.next(), it.next()) else {
        return Err(bad());
    };
    let (y, m, d) = (
        y.parse::<i32>().map_err(|_| bad())?,
        m.parse::<u8>().map_err(|_| bad())?,
        d.parse::<u8>().map_err(|_| bad())?,
    );
    let month = time::Month::try_from(m).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(y, month, d).map_err(|_| bad())?;
    Ok(date.with_hms(23, 59, 59).map_err(|_| bad())?.assume_utc())
}

pub fn run(cmd: CertsCommand) -> Result<(), CliError> {
    match cmd {
        CertsCommand::Ca { out, name, days, force } => ca(&out, &name, days, force),
        CertsCommand::Server(a) => leaf(a, true),
        CertsCommand::Client(a) => leaf(a, false),
    }
}

fn rc(what: &str) -> impl Fn(rcgen::Error) -> CliError + '_ {
    move |e| CliError::refused(format!("{what}: {e}"))
}

fn ca(out: &Path, name: &str, days: u32, force: bool) -> Result<(), CliError> {
    let (cert_path, key_path) = (out.join("ca.pem"), out.join("ca.key"));
    refuse_overwrite(&[&cert_path, &key_path], force)?;
    let key = KeyPair::generate().map_err(rc("generating the CA key"))?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, name);
    // Signs end-entity certificates only: no intermediate CAs below it.
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days.into());
    let cert = p.self_signed(&key).map_err(rc("making the CA certificate"))?;
    write_pair(out, &cert_path, &cert.pem(), &key_path, &key.serialize_pem(), force)?;
    println!("wrote {} (CA certificate) and {} (its key, 0600)", cert_path.display(), key_path.display());
    Ok(())
}

fn leaf(a: LeafArgs, server: bool) -> Result<(), CliError> {
    let first = &a.name[0];
    if first.is_empty() || first.contains(['/', '\0']) || first.starts_with('.') {
        return Err(CliError::usage(format!("--name '{first}' cannot name a file: use letters, digits, '-', '.'")));
    }
    let ca_cert = a.ca.join("ca.pem");
    let ca_key = a.ca.join("ca.key");
    let read = |p: &Path| {
        fs::read_to_string(p).map_err(|e| {
            CliError::usage(format!(
                "cannot read {}: {e} (make the CA with `chaosctl certs ca --out DIR`)",
                p.display()
            ))
        })
    };
    let ca_key_pair = KeyPair::from_pem(&read(&ca_key)?)
        .map_err(|e| CliError::usage(format!("{} is not a PEM private key: {e}", ca_key.display())))?;
    let issuer = Issuer::from_ca_cert_pem(&read(&ca_cert)?, ca_key_pair)
        .map_err(|e| CliError::usage(format!("{} is not a CA certificate: {e}", ca_cert.display())))?;

    let out = a.out.clone().unwrap_or_else(|| a.ca.clone());
    let (cert_path, key_path) = (out.join(format!("{first}.pem")), out.join(format!("{first}.key")));
    refuse_overwrite(&[&cert_path, &key_path], a.force)?;

    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, first.as_str());
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages =
        vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    p.use_authority_key_identifier_extension = true;
    for n in &a.name {
        // A client's name need not be a DNS name (e.g. "runner@ops"): it is
        // its CN, and a SAN only when it can be one.
        match n.as_str().try_into() {
            Ok(dns) => p.subject_alt_names.push(SanType::DnsName(dns)),
            Err(_) if server => {
                return Err(CliError::usage(format!(
                    "--name '{n}' is not a DNS name: a server's names are host names"
                )));
            }
            Err(_) => {}
        }
    }
    if !server && !a.addrs.is_empty() {
        return Err(CliError::usage("--addr is for server certificates: a client certificate has a --name"));
    }
    p.subject_alt_names.extend(a.addrs.iter().map(|ip| SanType::IpAddress(*ip)));
    let now = OffsetDateTime::now_utc();
    match a.not_after {
        Some(end) => {
            p.not_after = end;
            p.not_before = (end - Duration::days(1)).min(now - Duration::hours(1));
        }
        None => {
            p.not_before = now - Duration::hours(1);
            p.not_after = now + Duration::days(a.days.into());
        }
    }
    let key = KeyPair::generate().map_err(rc("generating a key"))?;
    let cert = p.signed_by(&key, &issuer).map_err(rc("signing the certificate"))?;
    write_pair(&out, &cert_path, &cert.pem(), &key_path, &key.serialize_pem(), a.force)?;
    let kind = if server { "server" } else { "client" };
    let expired = if p.not_after < now { " (already expired, as asked)" } else { "" };
    println!("wrote {} ({kind} certificate{expired}) and {} (its key, 0600)", cert_path.display(), key_path.display());
    Ok(())
}

fn refuse_overwrite(paths: &[&Path], force: bool) -> Result<(), CliError> {
    if force {
        return Ok(());
    }
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(CliError::usage(format!("{} exists: pass --force to replace it", p.display()))),
        None => Ok(()),
    }
}

fn write_pair(dir: &Path, cert: &Path, cert_pem: &str, key: &Path, key_pem: &str, force: bool) -> Result<(), CliError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CliError::usage(format!("cannot create {}: {e}", dir.display())))?;
    // The key first, so that a certificate is never there without its key.
    write_file(key, key_pem, 0o600, force)?;
    write_file(cert, cert_pem, 0o644, force)
}

fn write_file(path: &Path, text: &str, mode: u32, force: bool) -> Result<(), CliError> {
    let fail = |e: std::io::Error| CliError::usage(format!("cannot write {}: {e}", path.display()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .create_new(!force)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(fail)?;
    // An existing file (with --force) keeps its mode: set it.
    f.set_permissions(fs::Permissions::from_mode(mode)).map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(parse_date("2020-01-31").unwrap().date().to_string(), "2020-01-31");
        assert!(parse_date("2020-02-30").is_err());
        assert!(parse_date("yesterday").is_err());
    }

    #[test]
    fn ca_then_leaves_with_modes_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("pki");
        ca(&ca_dir, "test CA", 10, false).unwrap();
        let mode = |p: &str| fs::metadata(ca_dir.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("ca.key"), 0o600);
        let again = ca(&ca_dir, "test CA", 10, false).unwrap_err();
        assert!(again.message.contains("exists: pass --force"), "{}", again.message);
        let args = |name: &str| LeafArgs {
            ca: ca_dir.clone(),
            name: vec![name.into()],
            addrs: vec!["127.0.0.1".parse().unwrap()],
            out: None,
            days: 1,
            not_after: None,
            force: false,
        };
        leaf(args("node1"), true).unwrap();
        assert_eq!(mode("node1.key"), 0o600);
        let pem = fs::read_to_string(ca_dir.join("node1.pem")).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let e = leaf(args("ops"), false).err().unwrap();
        assert!(e.message.contains("--addr is for server"), "{}", e.message);
    }
}
