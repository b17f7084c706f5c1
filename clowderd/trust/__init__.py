"""Trust between the roles: the cluster's certificate authority, node identities, mutual TLS and the
authorization of every gRPC call between roles.

- certs.py: keys, certificate requests and what a certificate says (node id, name, roles, serial);
  `cryptography` does all the X.509 work.
- ca.py: the cluster CA, kept by the controller, which issues the nodes' certificates.
- tokens.py: the join and admin tokens' text form: a secret and the CA's fingerprint.
- identity.py: a node's key, certificate and CA bundle on disk, renewed in place; the TLS credentials
  of its listeners and channels.
- enroll.py: how a node that has no certificate gets one (the CA pinned by the join token's
  fingerprint, then Enrollment.Join).
- authz.py: the server side: who is calling (the certificate of the TLS peer), whether that
  certificate is still trusted, and whether its roles may call the method; refusals are logged.
- dial.py: channels to other roles, presenting the node's certificate.

The controller's public listener and the lb's are not between roles: they take tokens and API keys.
"""
