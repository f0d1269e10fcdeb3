#if canImport(Glibc)
import Glibc
#endif

/// Which addresses outgoing requests may connect to: the answer to "a task may name any URL".
///
/// Rules are host names (`metadata.google.internal`, `*.internal`) or CIDR ranges
/// (`169.254.0.0/16`, `fe80::/10`, `10.0.0.5`). A request is refused when its host name or the
/// address it actually connects to (after DNS, checked in libcurl's open-socket callback, so a
/// name that resolves to a denied address is caught too) matches a `deny` rule, or, when `allow`
/// is not empty, matches no `allow` rule. IPv4-mapped IPv6 addresses are checked as IPv4.
///
/// Pure: no I/O.
public struct AddressPolicy: Sendable, Hashable {
    /// One rule: a CIDR range or a host name pattern.
    public enum Rule: Sendable, Hashable, CustomStringConvertible {
        case network(CIDR)
        /// Lowercased; `*.example.com` matches subdomains, not `example.com` itself.
        case host(String)

        public var description: String {
            switch self {
            case .network(let cidr): return cidr.description
            case .host(let name): return name
            }
        }
    }

    public var allow: [Rule]
    public var deny: [Rule]

    /// Link-local (cloud metadata at 169.254.169.254 among them), "this network", multicast,
    /// broadcast and the IPv6 equivalents, plus AWS's IPv6 metadata address. Loopback and private
    /// ranges are allowed: callbacks on the same host or network are the common case for a
    /// self-hosted bridge; deny them if the bridge's network holds services tasks must not reach.
    public static let defaultDeny: [Rule] = [
        "0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
        "::/128", "fe80::/10", "ff00::/8", "fd00:ec2::254/128",
    ].compactMap { try? Self.parse($0) }

    public init(allow: [Rule] = [], deny: [Rule] = Self.defaultDeny) {
        self.allow = allow
        self.deny = deny
    }

    public struct InvalidRule: Error, CustomStringConvertible {
        public var description: String
    }

    /// Parses a rule: a CIDR range, a bare address (a /32 or /128), or a host name pattern.
    public static func parse(_ text: String) throws(InvalidRule) -> Rule {
        let trimmed = text.trimmingASCIISpaces()
        if let cidr = CIDR(trimmed) { return .network(cidr) }
        let lower = trimmed.lowercased()
        let name = lower.hasPrefix("*.") ? String(lower.dropFirst(2)) : lower
        guard !name.isEmpty, name.utf8.allSatisfy({ ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D || $0 == 0x2E }),
              !trimmed.contains("/")
        else {
            throw InvalidRule(description: "'\(text)' is neither a CIDR range (10.0.0.0/8, fe80::/10), an address, nor a host name (*.internal)")
        }
        return .host(lower)
    }

    /// Why a request to `host` connecting to `address` is refused, or nil. Without an address
    /// (before DNS) only what the name decides is answered; the address is checked at connect.
    public func refusal(host: String, address: IPAddress?) -> String? {
        let host = host.lowercased()
        let address = (address ?? IPAddress(host))?.unmapped
        if let rule = self.deny.first(where: { $0.matches(host: host) }) {
            return "the host \(host) is denied by the rule \(rule)"
        }
        if let address, let rule = self.deny.first(where: { $0.matches(address: address) }) {
            return "the address \(address) is denied by the rule \(rule)"
        }
        guard !self.allow.isEmpty else { return nil }
        if self.allow.contains(where: { $0.matches(host: host) }) { return nil }
        guard let address else {
            // Only the address can tell now.
            return self.allow.contains(where: { $0.isNetwork }) ? nil : "the host \(host) matches no allow rule"
        }
        if self.allow.contains(where: { $0.matches(address: address) }) { return nil }
        return "the host \(host) (address \(address)) matches no allow rule"
    }
}

extension AddressPolicy.Rule {
    var isNetwork: Bool {
        if case .network = self { return true }
        return false
    }

    func matches(address: IPAddress) -> Bool {
        guard case .network(let cidr) = self else { return false }
        return cidr.contains(address)
    }

    func matches(host: String) -> Bool {
        guard case .host(let pattern) = self else { return false }
        if pattern.hasPrefix("*.") { return host.hasSuffix(pattern.dropFirst(1)) }
        return host == pattern
    }
}

/// An IPv4 or IPv6 address, as 16 bytes (IPv4 as the last 4, with `isV4`).
public struct IPAddress: Sendable, Hashable, CustomStringConvertible {
    public let bytes: [UInt8]
    public let isV4: Bool

    public init?(_ text: String) {
        var text = text
        if text.hasPrefix("["), text.hasSuffix("]") { text = String(text.dropFirst().dropLast()) }
        var v4 = in_addr()
        var v6 = in6_addr()
        // inet_pton, unlike inet_aton, accepts only the dotted-quad form: '2130706433' and
        // '0x7f.1' are host names here, resolved by DNS and then checked as addresses.
        if inet_pton(AF_INET, text, &v4) == 1 {
            self.init(v4: withUnsafeBytes(of: v4.s_addr) { Array($0) })
        } else if inet_pton(AF_INET6, text, &v6) == 1 {
            self.init(v6: withUnsafeBytes(of: v6) { Array($0) })
        } else {
            return nil
        }
    }

    public init(v4 bytes: [UInt8]) {
        self.bytes = bytes
        self.isV4 = true
    }

    public init(v6 bytes: [UInt8]) {
        self.bytes = bytes
        self.isV4 = false
    }

    /// `::ffff:a.b.c.d` as `a.b.c.d`.
    public var unmapped: IPAddress {
        guard !self.isV4, self.bytes.count == 16, self.bytes[0..<10].allSatisfy({ $0 == 0 }), self.bytes[10] == 0xFF, self.bytes[11] == 0xFF
        else { return self }
        return IPAddress(v4: Array(self.bytes[12..<16]))
    }

    public var description: String {
        if self.isV4 { return self.bytes.map(String.init).joined(separator: ".") }
        var groups: [String] = []
        for i in stride(from: 0, to: 16, by: 2) { groups.append(String(UInt16(self.bytes[i]) << 8 | UInt16(self.bytes[i + 1]), radix: 16)) }
        return groups.joined(separator: ":")
    }
}

/// A network: an address and a prefix length.
public struct CIDR: Sendable, Hashable, CustomStringConvertible {
    public let network: IPAddress
    public let prefix: Int

    public init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard let address = IPAddress(String(parts[0])) else { return nil }
        let limit = address.isV4 ? 32 : 128
        var prefix = limit
        if parts.count == 2 {
            guard let p = Int(parts[1]), (0...limit).contains(p) else { return nil }
            prefix = p
        }
        self.network = address
        self.prefix = prefix
    }

    public func contains(_ address: IPAddress) -> Bool {
        guard address.isV4 == self.network.isV4, address.bytes.count == self.network.bytes.count else { return false }
        var bits = self.prefix
        for (a, b) in zip(address.bytes, self.network.bytes) {
            if bits <= 0 { return true }
            let take = min(8, bits)
            let mask = UInt8(truncatingIfNeeded: 0xFF << (8 - take))
            if a & mask != b & mask { return false }
            bits -= take
        }
        return true
    }

    public var description: String { "\(self.network)/\(self.prefix)" }
}

extension String {
    func trimmingASCIISpaces() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return String(s)
    }
}
