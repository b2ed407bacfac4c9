package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// chart is what the renderer reads from a chart directory.
type chart struct {
	dir      string
	name     string
	meta     map[string]interface{} // Chart.yaml
	defaults map[string]interface{} // values.yaml
	schema   []byte                 // values.schema.json, nil when the chart has none
}

func loadChart(dir string) (*chart, error) {
	meta, err := readYAMLMap(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		return nil, err
	}
	name, _ := meta["name"].(string)
	if name == "" {
		return nil, fmt.Errorf("%s: Chart.yaml has no name", dir)
	}
	c := &chart{dir: dir, name: name, meta: meta, defaults: map[string]interface{}{}}
	if _, err := os.Stat(filepath.Join(dir, "values.yaml")); err == nil {
		if c.defaults, err = readYAMLMap(filepath.Join(dir, "values.yaml")); err != nil {
			return nil, err
		}
	}
	schema, err := os.ReadFile(filepath.Join(dir, "values.schema.json"))
	if err == nil {
		c.schema = schema
	} else if !os.IsNotExist(err) {
		return nil, err
	}
	return c, nil
}

// readYAMLMap reads a YAML file whose top level is a mapping (an empty file is an empty map).
func readYAMLMap(path string) (map[string]interface{}, error) {
	text, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var doc interface{}
	if err := yaml.Unmarshal(text, &doc); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	doc = normalize(doc)
	if doc == nil {
		return map[string]interface{}{}, nil
	}
	m, ok := doc.(map[string]interface{})
	if !ok {
		return nil, fmt.Errorf("%s: the top level must be a mapping", path)
	}
	return m, nil
}

// normalize turns every mapping into map[string]interface{} (YAML allows other key types;
// templates and the JSON schema validator want string keys).
func normalize(v interface{}) interface{} {
	switch t := v.(type) {
	case map[string]interface{}:
		for k, e := range t {
			t[k] = normalize(e)
		}
		return t
	case map[interface{}]interface{}:
		m := make(map[string]interface{}, len(t))
		for k, e := range t {
			m[fmt.Sprint(k)] = normalize(e)
		}
		return m
	case []interface{}:
		for i, e := range t {
			t[i] = normalize(e)
		}
		return t
	}
	return v
}

// mergedValues is helm's order: the user's files in order, then the --set assignments, then the
// --set-file ones, all over the chart's defaults. A null in the user's values removes the
// default.
func mergedValues(defaults map[string]interface{}, files, sets, setFiles []string) (map[string]interface{}, error) {
	user := map[string]interface{}{}
	for _, f := range files {
		m, err := readYAMLMap(f)
		if err != nil {
			return nil, err
		}
		mergeInto(user, m)
	}
	for _, s := range sets {
		if err := applySet(user, s); err != nil {
			return nil, err
		}
	}
	for _, s := range setFiles {
		if err := applySetFile(user, s); err != nil {
			return nil, err
		}
	}
	return coalesce(user, defaults), nil
}

// mergeInto copies src over dst: maps merge key by key, anything else replaces.
func mergeInto(dst, src map[string]interface{}) {
	for k, v := range src {
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				mergeInto(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
}

// coalesce returns user's values completed with the defaults; keys the user set to null are
// dropped, with their defaults.
func coalesce(user, defaults map[string]interface{}) map[string]interface{} {
	out := map[string]interface{}{}
	for k, dv := range defaults {
		uv, set := user[k]
		switch {
		case !set:
			out[k] = deepCopy(dv)
		case uv == nil:
			// null: the default is removed.
		default:
			um, uIsMap := uv.(map[string]interface{})
			dm, dIsMap := dv.(map[string]interface{})
			if uIsMap && dIsMap {
				out[k] = coalesce(um, dm)
			} else {
				out[k] = dropNulls(uv)
			}
		}
	}
	for k, uv := range user {
		if _, known := defaults[k]; known || uv == nil {
			continue
		}
		out[k] = dropNulls(uv)
	}
	return out
}

func dropNulls(v interface{}) interface{} {
	m, ok := v.(map[string]interface{})
	if !ok {
		return v
	}
	out := map[string]interface{}{}
	for k, e := range m {
		if e != nil {
			out[k] = dropNulls(e)
		}
	}
	return out
}

func deepCopy(v interface{}) interface{} {
	switch t := v.(type) {
	case map[string]interface{}:
		m := make(map[string]interface{}, len(t))
		for k, e := range t {
			m[k] = deepCopy(e)
		}
		return m
	case []interface{}:
		l := make([]interface{}, len(t))
		for i, e := range t {
			l[i] = deepCopy(e)
		}
		return l
	}
	return v
}

// applySet applies one --set argument: comma-separated key.path=value assignments. A key
// segment may carry a list index (`name[0]`); `\.` and `\,` escape a dot or comma. Values are
// typed as helm types them: true/false, null, integers without leading zeros, `{a,b}` lists;
// everything else (including "1.5") is a string.
func applySet(values map[string]interface{}, arg string) error {
	for _, assignment := range splitUnescaped(arg, ',', true) {
		eq := indexUnescaped(assignment, '=')
		if eq < 0 {
			return fmt.Errorf("--set %q: expected key=value", assignment)
		}
		key, raw := assignment[:eq], assignment[eq+1:]
		var value interface{}
		if strings.HasPrefix(raw, "{") && strings.HasSuffix(raw, "}") {
			list := []interface{}{}
			if inner := raw[1 : len(raw)-1]; inner != "" {
				for _, item := range splitUnescaped(inner, ',', false) {
					list = append(list, typedValue(unescape(item)))
				}
			}
			value = list
		} else {
			value = typedValue(unescape(raw))
		}
		if err := setPath(values, splitUnescaped(key, '.', false), value); err != nil {
			return fmt.Errorf("--set %q: %v", assignment, err)
		}
	}
	return nil
}

// applySetFile applies one --set-file argument: comma-separated key.path=FILE assignments, each
// setting the key to the file's contents, a string (helm never types them).
func applySetFile(values map[string]interface{}, arg string) error {
	for _, assignment := range splitUnescaped(arg, ',', false) {
		eq := indexUnescaped(assignment, '=')
		if eq < 0 {
			return fmt.Errorf("--set-file %q: expected key=path", assignment)
		}
		key, path := assignment[:eq], assignment[eq+1:]
		text, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("--set-file %q: %v", assignment, err)
		}
		if err := setPath(values, splitUnescaped(key, '.', false), string(text)); err != nil {
			return fmt.Errorf("--set-file %q: %v", assignment, err)
		}
	}
	return nil
}

func typedValue(s string) interface{} {
	switch s {
	case "true":
		return true
	case "false":
		return false
	case "null":
		return nil
	case "0":
		return int64(0)
	}
	if len(s) > 0 && s[0] != '0' && !(len(s) > 1 && s[0] == '-' && s[1] == '0') {
		if n, err := strconv.ParseInt(s, 10, 64); err == nil {
			return n
		}
	}
	return s
}

// setPath stores value at the key segments, creating maps and growing lists on the way.
func setPath(m map[string]interface{}, segments []string, value interface{}) error {
	seg := unescape(segments[0])
	last := len(segments) == 1
	name, index, hasIndex, err := splitIndex(seg)
	if err != nil {
		return err
	}
	if name == "" {
		return fmt.Errorf("empty key")
	}
	if !hasIndex {
		if last {
			m[name] = value
			return nil
		}
		next, ok := m[name].(map[string]interface{})
		if !ok {
			next = map[string]interface{}{}
			m[name] = next
		}
		return setPath(next, segments[1:], value)
	}
	list, _ := m[name].([]interface{})
	for len(list) <= index {
		list = append(list, nil)
	}
	if last {
		list[index] = value
	} else {
		next, ok := list[index].(map[string]interface{})
		if !ok {
			next = map[string]interface{}{}
			list[index] = next
		}
		if err := setPath(next, segments[1:], value); err != nil {
			return err
		}
	}
	m[name] = list
	return nil
}

// splitIndex splits "name[3]" into ("name", 3, true).
func splitIndex(seg string) (string, int, bool, error) {
	open := strings.IndexByte(seg, '[')
	if open < 0 || !strings.HasSuffix(seg, "]") {
		return seg, 0, false, nil
	}
	n, err := strconv.Atoi(seg[open+1 : len(seg)-1])
	if err != nil || n < 0 || n > 10000 {
		return "", 0, false, fmt.Errorf("bad list index in %q", seg)
	}
	return seg[:open], n, true, nil
}

// splitUnescaped splits on sep where it is not escaped by a backslash (and, with braces, not
// inside `{...}`); escapes are kept for the next step.
func splitUnescaped(s string, sep byte, braces bool) []string {
	var parts []string
	depth, start := 0, 0
	for i := 0; i < len(s); i++ {
		switch {
		case s[i] == '\\':
			i++
		case braces && s[i] == '{':
			depth++
		case braces && s[i] == '}' && depth > 0:
			depth--
		case s[i] == sep && depth == 0:
			parts = append(parts, s[start:i])
			start = i + 1
		}
	}
	return append(parts, s[start:])
}

func indexUnescaped(s string, c byte) int {
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' {
			i++
		} else if s[i] == c {
			return i
		}
	}
	return -1
}

func unescape(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+1 < len(s) {
			i++
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
