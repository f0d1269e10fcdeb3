import Foundation
import Yams

/// Reads `topology/*.yaml` files into a ``TopologySpec``, reporting every problem with its file,
/// line and key path.
public enum TopologyLoader {
    /// Loads files and directories (every `*.yaml`/`*.yml` in a directory, sorted).
    public static func load(paths: [String]) throws(TopologyError) -> TopologySpec {
        var sources: [(name: String, text: String)] = []
        var issues: [TopologyIssue] = []
        for path in paths {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
                issues.append(TopologyIssue("no such file or directory", at: SourceLocation(file: path, keyPath: "")))
                continue
            }
            let files: [String]
            if isDirectory.boolValue {
                let names = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
                files = names.filter { $0.hasSuffix(".yaml") || $0.hasSuffix(".yml") }.sorted()
                    .map { (path as NSString).appendingPathComponent($0) }
                if files.isEmpty {
                    issues.append(TopologyIssue("the directory holds no .yaml files", at: SourceLocation(file: path, keyPath: "")))
                }
            } else {
                files = [path]
            }
            for file in files {
                guard let data = FileManager.default.contents(atPath: file) else {
                    issues.append(TopologyIssue("cannot read the file", at: SourceLocation(file: file, keyPath: "")))
                    continue
                }
                sources.append((file, String(decoding: data, as: UTF8.self)))
            }
        }
        if !issues.isEmpty { throw TopologyError(issues) }
        return try self.parse(sources)
    }

    /// Parses YAML documents (name, text) into one spec. Sections other than `work_queues` and
    /// `objects` may appear in one file only.
    public static func parse(_ sources: [(name: String, text: String)]) throws(TopologyError) -> TopologySpec {
        var reader = Reader()
        var spec = TopologySpec()
        var sectionOwners: [String: SourceLocation] = [:]
        for source in sources {
            reader.file = source.name
            let node: Node?
            do {
                node = try Yams.compose(yaml: source.text)
            } catch let error as YamlError {
                reader.fail("not valid YAML: \(Self.describe(error))", at: SourceLocation(file: source.name, line: Self.line(of: error), keyPath: ""))
                continue
            } catch {
                reader.fail("not valid YAML: \(error)", at: SourceLocation(file: source.name, keyPath: ""))
                continue
            }
            guard let node else { continue }  // empty file
            reader.readDocument(node, into: &spec, sectionOwners: &sectionOwners)
        }
        // Cross-references only make sense once every file was read without a syntax error.
        if !reader.issues.contains(where: { $0.message.hasPrefix("not valid YAML") }) { reader.validate(spec) }
        if !reader.issues.isEmpty { throw TopologyError(reader.issues) }
        return spec
    }

    private static func describe(_ error: YamlError) -> String {
        switch error {
        case .scanner(let context, let problem, _, _), .parser(let context, let problem, _, _),
             .composer(let context, let problem, _, _):
            return [context?.text, problem].compactMap { $0 }.filter { !$0.isEmpty }.joined(separator: ": ")
        case .duplicatedKeysInMapping(let duplicates, _):
            return "duplicate key \(duplicates.map { "'\($0)'" }.joined(separator: ", ")) in one mapping"
        default:
            return "\(error)"
        }
    }

    private static func line(of error: YamlError) -> Int? {
        switch error {
        case .scanner(_, _, let mark, _), .parser(_, _, let mark, _), .composer(_, _, let mark, _): return mark.line
        case .duplicatedKeysInMapping(_, let context): return context.mark.line
        default: return nil
        }
    }
}

/// Walks YAML nodes, collecting issues instead of stopping at the first.
struct Reader {
    var file = ""
    var issues: [TopologyIssue] = []

    mutating func fail(_ message: String, at location: SourceLocation?) {
        self.issues.append(TopologyIssue(message, at: location))
    }

    func location(_ node: Node, _ path: String) -> SourceLocation {
        SourceLocation(file: self.file, line: node.mark?.line, column: node.mark?.column, keyPath: path)
    }

    /// The entries of a mapping with the keys checked against `allowed` (nil: any key).
    mutating func mapping(_ node: Node, _ path: String, allowed: [String]?) -> [(key: String, node: Node, path: String)]? {
        guard case .mapping(let mapping) = node else {
            self.fail("expected a mapping (key: value lines), found \(Self.kind(node))", at: self.location(node, path))
            return nil
        }
        var seen: [String: Node] = [:]
        var entries: [(key: String, node: Node, path: String)] = []
        for (keyNode, value) in mapping {
            guard case .scalar(let scalar) = keyNode else {
                self.fail("keys must be plain names", at: self.location(keyNode, path))
                continue
            }
            let key = scalar.string
            let childPath = path.isEmpty ? key : "\(path).\(key)"
            if let first = seen[key] {
                self.fail("duplicate key '\(key)' (first at line \(first.mark?.line ?? 0))", at: self.location(keyNode, childPath))
                continue
            }
            seen[key] = keyNode
            if let allowed, !allowed.contains(key) {
                self.fail("unknown key '\(key)'; expected one of: \(allowed.joined(separator: ", "))", at: self.location(keyNode, childPath))
                continue
            }
            entries.append((key, value, childPath))
        }
        return entries
    }

    static func kind(_ node: Node) -> String {
        switch node {
        case .mapping: return "a mapping"
        case .sequence: return "a list"
        case .scalar(let s): return s.string.isEmpty ? "nothing" : "'\(s.string)'"
        case .alias: return "an alias"
        }
    }

    private static func tag(_ node: Node) -> Tag.Name? {
        guard case .scalar = node else { return nil }
        return Tag.Name(rawValue: node.tag.description)
    }

    mutating func string(_ node: Node, _ path: String) -> String? {
        guard case .scalar(let scalar) = node, Self.tag(node) != .null else {
            self.fail("expected a string, found \(Self.kind(node))", at: self.location(node, path))
            return nil
        }
        return scalar.string
    }

    /// A name RabbitMQ accepts for an exchange or queue the client declares.
    mutating func name(_ node: Node, _ path: String) -> String? {
        guard let name = self.string(node, path) else { return nil }
        if let problem = Self.nameProblem(name) {
            self.fail(problem, at: self.location(node, path))
            return nil
        }
        return name
    }

    static func nameProblem(_ name: String) -> String? {
        if name.isEmpty { return "a name may not be empty" }
        if name.utf8.count > 255 { return "'\(name.prefix(40))…' is longer than RabbitMQ's 255-byte limit" }
        if name.hasPrefix("amq.") { return "'\(name)' starts with 'amq.', which RabbitMQ reserves for itself" }
        if name.unicodeScalars.contains(where: { $0.properties.generalCategory == .control }) {
            return "'\(name)' contains control characters"
        }
        return nil
    }

    mutating func int(_ node: Node, _ path: String, min: Int = 0, max: Int = Int.max) -> Int? {
        guard Self.tag(node) == .int, let value = node.int, value >= min, value <= max else {
            let range = max == Int.max ? "≥ \(min)" : "in \(min)...\(max)"
            self.fail("expected an integer \(range), found \(Self.kind(node))", at: self.location(node, path))
            return nil
        }
        return value
    }

    mutating func bool(_ node: Node, _ path: String) -> Bool? {
        guard Self.tag(node) == .bool, let value = node.bool else {
            self.fail("expected true or false, found \(Self.kind(node))", at: self.location(node, path))
            return nil
        }
        return value
    }

    mutating func timeSpan(_ node: Node, _ path: String, allowZero: Bool = false) -> TimeSpan? {
        guard case .scalar(let scalar) = node, let span = TimeSpan(scalar.string), allowZero || span.milliseconds > 0 else {
            self.fail("expected a duration such as 500ms, 30s, 2m, 1h or 7d, found \(Self.kind(node))", at: self.location(node, path))
            return nil
        }
        return span
    }

    mutating func json(_ node: Node, _ path: String) -> JSONValue? {
        switch node {
        case .scalar(let scalar):
            switch Self.tag(node) {
            case .int?: return node.int.map { .int(Int64($0)) }
            case .bool?: return node.bool.map { .bool($0) }
            case .float?: return node.float.map { .double($0) }
            case .null?: return .null
            default: return .string(scalar.string)
            }
        case .sequence(let sequence):
            var values: [JSONValue] = []
            for (index, element) in sequence.enumerated() {
                if let value = self.json(element, "\(path)[\(index)]") { values.append(value) }
            }
            return .array(values)
        case .mapping:
            guard let entries = self.mapping(node, path, allowed: nil) else { return nil }
            var object: [String: JSONValue] = [:]
            for entry in entries { object[entry.key] = self.json(entry.node, entry.path) }
            return .object(object)
        case .alias:
            self.fail("YAML aliases are not supported here", at: self.location(node, path))
            return nil
        }
    }

    mutating func arguments(_ node: Node, _ path: String) -> [String: JSONValue] {
        guard case .object(let object)? = self.json(node, path) else {
            if case .mapping = node {} else {
                self.fail("expected a mapping of arguments", at: self.location(node, path))
            }
            return [:]
        }
        return object
    }

    mutating func list(_ node: Node, _ path: String) -> [(node: Node, path: String)]? {
        guard case .sequence(let sequence) = node else {
            self.fail("expected a list (lines starting with '- '), found \(Self.kind(node))", at: self.location(node, path))
            return nil
        }
        return sequence.enumerated().map { ($0.element, "\(path)[\($0.offset)]") }
    }
}
