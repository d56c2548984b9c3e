#!/usr/bin/env bash
# Test certificates, made with the openssl CLI at test time (P-256 keys, valid 2 days) in DIR:
#   ca.crt/.key                    the CA the server trusts for clients and the clients trust
#   server.crt/.key                signed by ca, SAN IP:127.0.0.1, IP:::1, DNS:localhost
#   client.crt/.key                signed by ca (clientAuth)
#   other-ca.crt/.key, other-client.crt/.key   a second CA and a client certificate it signed
#   other-server.crt/.key          signed by other-ca (a server the clients must not trust)
# Usage: make_certs.sh DIR
set -euo pipefail
d=$1
mkdir -p "$d"
cd "$d"
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
ca() {  # NAME CN
  key "$1.key"
  openssl req -x509 -new -key "$1.key" -out "$1.crt" -days 2 -subj "/CN=$2" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
leaf() {  # NAME CA CN EXTENSIONS
  key "$1.key"
  openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=$3"
  printf '%s\n' "$4" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -CAcreateserial -out "$1.crt" \
    -days 2 -extfile "$1.ext" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
ca ca kvm-test-ca
ca other-ca kvm-other-ca
srv=$'subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nextendedKeyUsage=serverAuth'
cli=$'extendedKeyUsage=clientAuth'
leaf server ca kvmanager "$srv"
leaf other-server other-ca kvmanager "$srv"
leaf client ca worker "$cli"
leaf other-client other-ca worker "$cli"
