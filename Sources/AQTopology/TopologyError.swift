/// One problem found in topology files, with where it is and what was expected.
public struct TopologyIssue: Sendable, Hashable, CustomStringConvertible {
    public var location: SourceLocation?
    public var message: String

    public init(_ message: String, at location: SourceLocation?) {
        self.location = location
        self.message = message
    }

    public var description: String {
        guard let location else { return self.message }
        return "\(location): \(self.message)"
    }
}

/// Every problem found in a set of topology files. Nothing is applied while there is one.
public struct TopologyError: Error, Sendable, CustomStringConvertible {
    public var issues: [TopologyIssue]

    public init(_ issues: [TopologyIssue]) { self.issues = issues }

    public var description: String {
        let count = self.issues.count
        return "\(count) problem\(count == 1 ? "" : "s") in the topology:\n" + self.issues.map { "  \($0)" }.joined(separator: "\n")
    }
}
