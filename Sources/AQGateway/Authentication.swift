import CAQOpenSSL

/// Checks bearer tokens against the configured hashes: the presented token is hashed (SHA-256)
/// and compared with every configured hash in constant time (`CRYPTO_memcmp`), all of them, so
/// neither the comparison nor which token matched shows in the time taken.
public struct TokenVerifier: Sendable {
    let tokens: [GatewayToken]

    public init(_ tokens: [GatewayToken]) { self.tokens = tokens }

    /// SHA-256 fetched once: OpenSSL 3 looks the algorithm up again on every call given
    /// `EVP_sha256()` (an implicit fetch, with locks).
    final class Digest: @unchecked Sendable {
        // @unchecked Sendable: `md` is set once here and never changed; OpenSSL documents a
        // fetched EVP_MD as usable from many threads at once (it is reference-counted and
        // read-only after the fetch).
        let md: OpaquePointer?
        init() { self.md = EVP_MD_fetch(nil, "SHA256", nil) }
        static let shared = Digest()
    }

    public static func sha256(_ bytes: [UInt8]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: 32)
        var size: UInt32 = 32
        let md = Digest.shared.md ?? EVP_sha256()
        _ = bytes.withUnsafeBytes { raw in
            out.withUnsafeMutableBufferPointer { EVP_Digest(raw.baseAddress, raw.count, $0.baseAddress, &size, md, nil) }
        }
        return out
    }

    public static func hex(_ bytes: [UInt8]) -> String {
        let digits = Array("0123456789abcdef".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count * 2)
        for byte in bytes {
            out.append(digits[Int(byte >> 4)])
            out.append(digits[Int(byte & 15)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The token an `Authorization` header value names, if any.
    public func verify(authorization: String?) -> GatewayToken? {
        guard let authorization, authorization.count > 7 else { return nil }
        let scheme = authorization.prefix(7)
        guard scheme.lowercased() == "bearer " else { return nil }
        let presented = Self.sha256(Array(authorization.dropFirst(7).utf8))
        var found: GatewayToken?
        for token in self.tokens {
            let same = presented.withUnsafeBytes { a in token.hash.withUnsafeBytes { b in CRYPTO_memcmp(a.baseAddress, b.baseAddress, 32) } }
            if same == 0, found == nil { found = token }
        }
        return found
    }
}
