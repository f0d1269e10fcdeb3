import Foundation

/// A span of time written the way operators write it: `500ms`, `30s`, `2m`, `1h`, `7d`.
public struct TimeSpan: Sendable, Hashable, Comparable, CustomStringConvertible {
    public var milliseconds: Int64

    public init(milliseconds: Int64) { self.milliseconds = milliseconds }
    public static func seconds(_ s: Int64) -> TimeSpan { TimeSpan(milliseconds: s * 1000) }
    public static func minutes(_ m: Int64) -> TimeSpan { TimeSpan(milliseconds: m * 60_000) }
    public static func hours(_ h: Int64) -> TimeSpan { TimeSpan(milliseconds: h * 3_600_000) }
    public static func days(_ d: Int64) -> TimeSpan { TimeSpan(milliseconds: d * 86_400_000) }

    private static let units: [(String, Int64)] = [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)]

    /// Parses `<integer><unit>` with unit ms, s, m, h or d.
    public init?(_ text: String) {
        let trimmed = text.trimmingCharacters(in: .whitespaces)
        let digits = trimmed.prefix(while: { $0.isASCII && $0.isNumber })
        let unit = String(trimmed.dropFirst(digits.count))
        guard !digits.isEmpty, let value = Int64(digits),
              let factor: Int64 = Self.units.first(where: { $0.0 == unit })?.1,
              value <= Int64.max / factor
        else { return nil }
        let product: Int64 = value * factor
        self.milliseconds = product
    }

    /// The shortest exact spelling: 5000 ms is `5s`, 90 s is `90s`, 120 s is `2m`.
    public var description: String {
        for (unit, factor) in Self.units where self.milliseconds % factor == 0 && self.milliseconds != 0 {
            return "\(self.milliseconds / factor)\(unit)"
        }
        return "0s"
    }

    public var seconds: Double { Double(self.milliseconds) / 1000 }
    public var duration: Duration { .milliseconds(self.milliseconds) }

    public static func < (a: TimeSpan, b: TimeSpan) -> Bool { a.milliseconds < b.milliseconds }
}

