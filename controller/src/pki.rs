//! The controller's certificate authority.
//!
//! `ztseg controller init` creates a CA (ECDSA P-256), the controller's server certificate and
//! a first admin identity. Every other identity is obtained through enrollment: the caller
//! generates its key locally and sends a CSR with a one-time join token; the CA signs the CSR's
//! public key with the role and name the token was created for — nothing else from the CSR
//! is used. The role and name live in one URI SAN, `spiffe://<trust-domain>/<role>/<name>`.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::auth::{Identity, Role};

/// File names inside a controller data directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// Certificates start this long before their issuance (clock skew between hosts). The
/// issuance time of a certificate is therefore its `notBefore` plus this.
pub const BACKDATE: time::Duration = time::Duration::minutes(5);

/// Default lifetime of an enrolled certificate.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_hours(30 * 24);

/// Passphrase protecting the CA key at rest. Never printed.
#[derive(Clone)]
pub struct Passphrase(Vec<u8>);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(..)")
    }
}

impl Passphrase {
    /// The first line of `path` (without its line end). The file should be readable by the
    /// controller's user only; an empty passphrase is refused.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw =
            fs::read(path).with_context(|| format!("reading the passphrase file {}", path.display()))?;
        let line = raw.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            bail!("the passphrase file {} is empty", path.display());
        }
        Ok(Self(line.to_vec()))
    }

    #[must_use]
    pub fn new(bytes: &[u8]) -> Self {
        Self(bytes.to_vec())
    }
}

/// PEM label of a PKCS#8 `EncryptedPrivateKeyInfo` (what `openssl pkey` reads with `-passin`).
const ENCRYPTED_KEY_LABEL: &str = "ENCRYPTED PRIVATE KEY";
/// PBKDF2-HMAC-SHA256 rounds for the CA key's encryption key.
const PBKDF2_ROUNDS: u32 = 600_000;

fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("no system randomness"))?;
    Ok(b)
}

/// The CA key as PKCS#8 PEM: plain, or encrypted with PBES2 (PBKDF2-HMAC-SHA256,
/// AES-256-CBC) under `passphrase`.
fn key_pem(key: &KeyPair, passphrase: Option<&Passphrase>) -> Result<String> {
    let Some(pass) = passphrase else { return Ok(key.serialize_pem()) };
    let der = key.serialize_der();
    let info = pkcs8::PrivateKeyInfo::try_from(der.as_slice()).context("encoding the CA key")?;
    let salt: [u8; 16] = random()?;
    let iv: [u8; 16] = random()?;
    let params = pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(PBKDF2_ROUNDS, &salt, &iv)
        .map_err(|e| anyhow::anyhow!("PBES2 parameters: {e}"))?;
    let sealed = info.encrypt_with_params(params, &pass.0).context("encrypting the CA key")?;
    Ok(sealed.to_pem(ENCRYPTED_KEY_LABEL, pkcs8::LineEnding::LF).context("encoding the CA key")?.to_string())
}

/// Read the CA key from its PEM, decrypting it when it is encrypted.
fn parse_key(pem: &str, passphrase: Option<&Passphrase>) -> Result<KeyPair> {
    if !pem.contains(&format!("-----BEGIN {ENCRYPTED_KEY_LABEL}-----")) {
        return KeyPair::from_pem(pem).context("parsing the CA key");
    }
    let Some(pass) = passphrase else {
        bail!(
            "{CA_KEY} is encrypted: give its passphrase (--ca-passphrase-file or ZTSEG_CA_PASSPHRASE_FILE)"
        );
    };
    let (label, doc) = pkcs8::SecretDocument::from_pem(pem).context("parsing the encrypted CA key")?;
    if label != ENCRYPTED_KEY_LABEL {
        bail!("{CA_KEY}: unexpected PEM label {label:?}");
    }
    let sealed =
        pkcs8::EncryptedPrivateKeyInfo::try_from(doc.as_bytes()).context("parsing the encrypted CA key")?;
    let plain = sealed
        .decrypt(&pass.0)
        .map_err(|_| anyhow::anyhow!("cannot decrypt {CA_KEY}: wrong passphrase, or the file is damaged"))?;
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(plain.as_bytes());
    KeyPair::try_from(&der).context("parsing the decrypted CA key")
}

/// A loaded CA: certificate PEM and signing key.
pub struct Ca {
    pub cert_pem: String,
    key: KeyPair,
    pub trust_domain: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("trust_domain", &self.trust_domain).finish_non_exhaustive()
    }
}

/// A certificate with its private key, both PEM.
#[derive(Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

/// Write a file readable by the owner only (private keys, tokens).
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn validity(params: &mut CertificateParams, not_before: OffsetDateTime, ttl: Duration) {
    params.not_before = not_before;
    params.not_after = not_before + ttl;
}

impl Ca {
    /// Create a new CA for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Self> {
        check_name("trust domain", trust_domain)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ztseg");
        dn.push(DnType::CommonName, format!("ztseg CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        validity(&mut params, OffsetDateTime::now_utc() - BACKDATE, Duration::from_hours(10 * 365 * 24));
        let cert = params.self_signed(&key)?;
        Ok(Self { cert_pem: cert.pem(), key, trust_domain: trust_domain.to_owned() })
    }

    /// Load the CA from a controller data directory; `passphrase` decrypts an encrypted key.
    pub fn load(dir: &Path, passphrase: Option<&Passphrase>) -> Result<Self> {
        let cert_pem = fs::read_to_string(dir.join(CA_CERT))
            .with_context(|| format!("reading {}", dir.join(CA_CERT).display()))?;
        let key_pem = fs::read_to_string(dir.join(CA_KEY))
            .with_context(|| format!("reading {}", dir.join(CA_KEY).display()))?;
        let key = parse_key(&key_pem, passphrase)?;
        let der = <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            cert_pem.as_bytes(),
        )
        .context("parsing the CA certificate")?;
        let trust_domain = ca_trust_domain(&der)?;
        Ok(Self { cert_pem, key, trust_domain })
    }

    /// Write the CA into `dir` (key 0600, encrypted when a passphrase is given).
    pub fn save(&self, dir: &Path, passphrase: Option<&Passphrase>) -> Result<()> {
        fs::create_dir_all(dir)?;
        fs::write(dir.join(CA_CERT), &self.cert_pem)?;
        self.save_key(dir, passphrase)
    }

    /// Rewrite only the key file: encrypt it, change its passphrase, or (`None`) store it
    /// plain.
    pub fn save_key(&self, dir: &Path, passphrase: Option<&Passphrase>) -> Result<()> {
        write_private(&dir.join(CA_KEY), key_pem(&self.key, passphrase)?.as_bytes())
    }

    /// Whether the CA key file in `dir` is encrypted.
    pub fn key_encrypted(dir: &Path) -> Result<bool> {
        let pem = fs::read_to_string(dir.join(CA_KEY))
            .with_context(|| format!("reading {}", dir.join(CA_KEY).display()))?;
        Ok(pem.contains(&format!("-----BEGIN {ENCRYPTED_KEY_LABEL}-----")))
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>> {
        Ok(Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?)
    }

    /// The controller's server certificate for the given DNS names / IP addresses.
    pub fn issue_server(&self, sans: &[String], ttl: Duration) -> Result<Issued> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "ztseg controller");
        params.subject_alt_names.push(SanType::URI(
            format!("spiffe://{}/{}/controller", self.trust_domain, Role::Controller.as_str()).try_into()?,
        ));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, OffsetDateTime::now_utc() - BACKDATE, ttl);
        let cert = params.signed_by(&key, &self.issuer()?)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    fn client_params(
        &self,
        role: Role,
        name: &str,
        not_before: OffsetDateTime,
        ttl: Duration,
    ) -> Result<CertificateParams> {
        check_name("name", name)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, format!("{}/{name}", role.as_str()));
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{}/{}/{name}", self.trust_domain, role.as_str()).try_into()?,
        )];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, not_before, ttl);
        Ok(params)
    }

    /// A client identity with a key generated here (bootstrap admin, tests).
    pub fn issue_client(&self, role: Role, name: &str, ttl: Duration) -> Result<Issued> {
        self.issue_client_at(role, name, OffsetDateTime::now_utc() - BACKDATE, ttl)
    }

    /// As [`Ca::issue_client`] with an explicit start of validity (an already expired
    /// certificate can be made for tests of the verifier).
    pub fn issue_client_at(
        &self,
        role: Role,
        name: &str,
        not_before: OffsetDateTime,
        ttl: Duration,
    ) -> Result<Issued> {
        let key = KeyPair::generate()?;
        let cert = self.client_params(role, name, not_before, ttl)?.signed_by(&key, &self.issuer()?)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Sign the public key of a PKCS#10 request for `role`/`name`. The request's own subject
    /// and extensions are ignored; its signature must verify (proof of key possession).
    pub fn sign_csr(
        &self,
        csr_der: &[u8],
        role: Role,
        name: &str,
        ttl: Duration,
    ) -> Result<(String, OffsetDateTime)> {
        let csr = parse_csr(csr_der)?;
        let not_before = OffsetDateTime::now_utc() - BACKDATE;
        let params = self.client_params(role, name, not_before, ttl)?;
        let not_after = params.not_after;
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok((cert.pem(), not_after))
    }
}

/// A PKCS#10 request (DER) whose signature verifies: the key it asks a certificate for is held
/// by the sender. Only its public key is used.
fn parse_csr(csr_der: &[u8]) -> Result<CertificateSigningRequestParams> {
    CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
        .map_err(|e| anyhow::anyhow!("certificate signing request rejected: {e}"))
}

/// Check a certificate signing request as [`Ca::sign_csr`] would, without signing anything
/// (enrollment checks it before it redeems the join token).
pub fn check_csr(csr_der: &[u8]) -> Result<()> {
    parse_csr(csr_der).map(drop)
}

/// Names (trust domain, identity names): lowercase letters, digits, `.` and `-`, 1..=63
/// characters, starting with a letter or digit.
pub fn check_name(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && s.as_bytes()[0].is_ascii_alphanumeric();
    if !ok {
        bail!(
            "{what} {s:?}: use 1 to 63 characters of a-z, 0-9, '.' and '-', starting with a letter or digit"
        );
    }
    Ok(())
}

fn ca_trust_domain(der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).context("parsing the CA certificate")?;
    for uri in uri_sans(&cert) {
        if let Some(td) = uri.strip_prefix("spiffe://")
            && !td.contains('/')
        {
            return Ok(td.to_owned());
        }
    }
    bail!("the CA certificate has no spiffe://<trust-domain> URI SAN")
}

fn uri_sans<'a>(cert: &'a x509_parser::certificate::X509Certificate<'_>) -> Vec<&'a str> {
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = n {
                out.push(*u);
            }
        }
    }
    out
}

/// The identity in a (chain-verified) peer certificate: exactly one
/// `spiffe://<trust_domain>/<role>/<name>` URI SAN.
pub fn identity_of(der: &[u8], trust_domain: &str) -> Result<Identity> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).context("parsing the peer certificate")?;
    let prefix = format!("spiffe://{trust_domain}/");
    let ids: Vec<&str> = uri_sans(&cert).into_iter().filter_map(|u| u.strip_prefix(&prefix)).collect();
    let [one] = ids.as_slice() else {
        bail!("the certificate must carry exactly one {prefix}<role>/<name> URI SAN (found {})", ids.len());
    };
    let (role, name) = one.split_once('/').context("identity URI without a name")?;
    let role: Role = role.parse()?;
    check_name("name", name)?;
    Ok(Identity { role, name: name.to_owned() })
}

/// Validity of a certificate (DER): `notBefore` and `notAfter` as Unix seconds.
pub fn validity_of(der: &[u8]) -> Result<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).context("parsing the certificate")?;
    Ok((cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp()))
}

/// The DER of the (first) certificate in a PEM text.
pub fn cert_der(pem: &str) -> Result<Vec<u8>> {
    let der = <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
        pem.as_bytes(),
    )
    .context("parsing the certificate PEM")?;
    Ok(der.to_vec())
}

/// Whether a certificate (PEM) should be renewed at Unix time `now`: less than a third of its
/// lifetime left.
pub fn needs_renewal(cert_pem: &str, now: i64) -> Result<bool> {
    let (nb, na) = validity_of(&cert_der(cert_pem)?)?;
    Ok(na - now < (na - nb) / 3)
}

/// Paths of a client identity on disk (`<dir>/<stem>.pem`, `<dir>/<stem>-key.pem`, CA).
#[derive(Debug, Clone)]
pub struct ClientFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ClientFiles {
    #[must_use]
    pub fn in_dir(dir: &Path, stem: &str) -> Self {
        Self {
            ca: dir.join(CA_CERT),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        }
    }

    /// Write an issued identity and the CA certificate. The new key and certificate are
    /// written beside the old ones first and then moved into place; an interruption between
    /// the two moves is completed by [`ClientFiles::recover`] (called before every use).
    pub fn save(&self, issued: &Issued, ca_pem: &str) -> Result<()> {
        if let Some(d) = self.cert.parent() {
            fs::create_dir_all(d)?;
        }
        fs::write(&self.ca, ca_pem)?;
        write_private(&pending(&self.key), issued.key_pem.as_bytes())?;
        write_private(&pending(&self.cert), issued.cert_pem.as_bytes())?;
        self.recover()
    }

    /// Finish a [`ClientFiles::save`] that was interrupted: key first, then certificate.
    pub fn recover(&self) -> Result<()> {
        for f in [&self.key, &self.cert] {
            let p = pending(f);
            if p.exists() {
                fs::rename(&p, f).with_context(|| format!("moving {} into place", p.display()))?;
            }
        }
        Ok(())
    }
}

fn pending(p: &Path) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(".new");
    PathBuf::from(s)
}

/// A fresh key and a CSR for it (enrollment, client side).
pub fn new_csr() -> Result<(Vec<u8>, String)> {
    let key = KeyPair::generate()?;
    let params = CertificateParams::new(Vec::<String>::new())?;
    let csr = params.serialize_request(&key)?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ztseg-pki-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn an_encrypted_ca_key_loads_only_with_its_passphrase() {
        let dir = temp_dir("enc");
        let ca = Ca::generate("ztseg.local").unwrap();
        let pass = Passphrase::new(b"correct horse battery staple");
        ca.save(&dir, Some(&pass)).unwrap();
        let pem = fs::read_to_string(dir.join(CA_KEY)).unwrap();
        assert!(pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"), "{pem}");
        assert!(!pem.contains("BEGIN PRIVATE KEY"));
        assert!(Ca::key_encrypted(&dir).unwrap());

        let e = Ca::load(&dir, None).unwrap_err().to_string();
        assert!(e.contains("encrypted") && e.contains("--ca-passphrase-file"), "{e}");
        let e = Ca::load(&dir, Some(&Passphrase::new(b"wrong"))).unwrap_err().to_string();
        assert!(e.contains("wrong passphrase"), "{e}");

        let loaded = Ca::load(&dir, Some(&pass)).unwrap();
        assert_eq!(loaded.key.public_key_pem(), ca.key.public_key_pem(), "the same key comes back");
        // A certificate the loaded CA signs chains to the CA certificate.
        let issued = loaded.issue_client(Role::Operator, "op", Duration::from_hours(1)).unwrap();
        let ca_der =
            <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
                ca.cert_pem.as_bytes(),
            )
            .unwrap();
        let leaf = <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::from_pem_slice(
            issued.cert_pem.as_bytes(),
        )
        .unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let (_, leaf_cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        leaf_cert.verify_signature(Some(ca_cert.public_key())).unwrap();
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_plain_ca_key_can_be_protected_and_its_passphrase_changed() {
        let dir = temp_dir("protect");
        let ca = Ca::generate("ztseg.local").unwrap();
        ca.save(&dir, None).unwrap();
        assert!(!Ca::key_encrypted(&dir).unwrap());
        let first = Passphrase::new(b"first");
        Ca::load(&dir, None).unwrap().save_key(&dir, Some(&first)).unwrap();
        assert!(Ca::key_encrypted(&dir).unwrap());
        let second = Passphrase::new(b"second");
        Ca::load(&dir, Some(&first)).unwrap().save_key(&dir, Some(&second)).unwrap();
        assert!(Ca::load(&dir, Some(&first)).is_err(), "the old passphrase no longer opens it");
        assert_eq!(Ca::load(&dir, Some(&second)).unwrap().key.public_key_pem(), ca.key.public_key_pem());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn passphrase_files_give_their_first_line_and_never_print_it() {
        let dir = temp_dir("passfile");
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pass");
        fs::write(&f, "s3cret\r\nignored\n").unwrap();
        let p = Passphrase::from_file(&f).unwrap();
        assert_eq!(p.0, b"s3cret");
        assert!(!format!("{p:?}").contains("s3cret"));
        fs::write(&f, "\n").unwrap();
        assert!(Passphrase::from_file(&f).unwrap_err().to_string().contains("empty"));
        assert!(Passphrase::from_file(&dir.join("missing")).is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn renewal_is_due_in_the_last_third_of_the_lifetime() {
        let ca = Ca::generate("ztseg.local").unwrap();
        let c = ca.issue_client(Role::Enforcer, "h", Duration::from_mins(50)).unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!(!needs_renewal(&c.cert_pem, now).unwrap());
        // notBefore is now - 300 s, notAfter now + 2700 s: due from now + 1700 s.
        assert!(!needs_renewal(&c.cert_pem, now + 1690).unwrap());
        assert!(needs_renewal(&c.cert_pem, now + 1710).unwrap());
    }

    #[test]
    fn an_interrupted_save_is_completed() {
        let dir = std::env::temp_dir().join(format!("ztseg-pki-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let files = ClientFiles::in_dir(&dir, "h");
        let ca = Ca::generate("ztseg.local").unwrap();
        let a = ca.issue_client(Role::Enforcer, "h", Duration::from_mins(50)).unwrap();
        files.save(&a, &ca.cert_pem).unwrap();
        // A second save stopped after the new files were written but before they moved.
        let b = ca.issue_client(Role::Enforcer, "h", Duration::from_mins(50)).unwrap();
        write_private(&pending(&files.key), b.key_pem.as_bytes()).unwrap();
        write_private(&pending(&files.cert), b.cert_pem.as_bytes()).unwrap();
        fs::rename(pending(&files.key), &files.key).unwrap();
        files.recover().unwrap();
        assert_eq!(fs::read_to_string(&files.cert).unwrap(), b.cert_pem);
        assert_eq!(fs::read_to_string(&files.key).unwrap(), b.key_pem);
        let _ = fs::remove_dir_all(&dir);
    }
}
