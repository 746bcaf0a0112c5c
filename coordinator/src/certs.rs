//! A development CA and a server certificate signed by it (`nexa-coordinator certs`).

use std::path::{Path, PathBuf};

/// What `write_dev_certs` wrote.
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// The CA certificate clients trust (`ca.pem`).
    pub ca: PathBuf,
    /// The server certificate (`server.pem`).
    pub cert: PathBuf,
    /// The server key (`server.key`, mode 0600).
    pub key: PathBuf,
}

/// Writes `ca.pem`, `ca.key`, `server.pem` and `server.key` into `dir`; the server
/// certificate names `hosts` (DNS names or IP addresses).
pub fn write_dev_certs(dir: &Path, hosts: &[String]) -> anyhow::Result<DevCerts> {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Nexa development CA");
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(hosts.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "nexa-coordinator");
    let cert = params.signed_by(&key, &ca)?;
    let out = DevCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&out.ca, ca.pem())?;
    std::fs::write(&out.cert, cert.pem())?;
    write_private(&out.key, key.serialize_pem().as_bytes())?;
    write_private(&dir.join("ca.key"), ca_key_pem.as_bytes())?;
    Ok(out)
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}
