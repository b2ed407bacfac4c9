package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v3"
)

// release is .Release for `helm template` (a first install).
type release struct {
	Name      string
	Namespace string
}

// render parses every template of the chart into one set (so partials are shared) and
// executes the manifests, or only NOTES.txt when notes is set. Every manifest is rendered (a
// template's `fail` fails the render whatever is shown); with showOnly, only the manifests of
// the templates it names are printed, as `helm template --show-only` does: a template path
// relative to the chart ("templates/sidecar.yaml", or a glob), each of which must render
// something.
func render(c *chart, values map[string]interface{}, rel release, notes bool, showOnly []string) (string, error) {
	files, err := templateFiles(c.dir)
	if err != nil {
		return "", err
	}
	root := template.New("").Option("missingkey=zero")
	root.Funcs(funcMap(root))
	var manifests []string
	notesName := ""
	for _, path := range files {
		text, err := os.ReadFile(path)
		if err != nil {
			return "", err
		}
		relPath, _ := filepath.Rel(c.dir, path)
		name := c.name + "/" + filepath.ToSlash(relPath)
		if _, err := root.New(name).Parse(string(text)); err != nil {
			return "", fmt.Errorf("parse error in %s", cleanError(err))
		}
		base := filepath.Base(path)
		switch {
		case base == "NOTES.txt":
			notesName = name
		case strings.HasPrefix(base, "_"):
		case strings.HasSuffix(base, ".yaml") || strings.HasSuffix(base, ".yml"):
			manifests = append(manifests, name)
		}
	}

	data := func(name string) map[string]interface{} {
		return map[string]interface{}{
			"Values": values,
			"Chart":  chartObject(c.meta),
			"Release": map[string]interface{}{
				"Name": rel.Name, "Namespace": rel.Namespace, "Service": "Helm",
				"IsInstall": true, "IsUpgrade": false, "Revision": 1,
			},
			"Capabilities": map[string]interface{}{
				"KubeVersion": map[string]interface{}{"Version": "v1.30.0", "Major": "1", "Minor": "30"},
			},
			"Template": map[string]interface{}{"Name": name, "BasePath": c.name + "/templates"},
		}
	}
	execute := func(name string) (string, error) {
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, data(name)); err != nil {
			return "", fmt.Errorf("execution error at %s", cleanError(err))
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}

	if notes {
		if notesName == "" {
			return "", nil
		}
		return execute(notesName)
	}
	rendered := map[string]string{}
	var shown []string
	for _, name := range manifests {
		text, err := execute(name)
		if err != nil {
			return "", err
		}
		if strings.TrimSpace(text) != "" {
			rendered[name] = text
			shown = append(shown, name)
		}
	}
	if len(showOnly) > 0 {
		if shown, err = selectManifests(c.name, shown, showOnly); err != nil {
			return "", err
		}
	}
	var out strings.Builder
	for _, name := range shown {
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", name, strings.TrimRight(rendered[name], "\n"))
	}
	return out.String(), nil
}

// selectManifests keeps the rendered manifests (named CHART/templates/FILE) whose path inside
// the chart matches one of the patterns, in the order of the patterns; a pattern that matches
// no rendered manifest is helm's error.
func selectManifests(chartName string, rendered, patterns []string) ([]string, error) {
	var out []string
	for _, pattern := range patterns {
		pattern = filepath.ToSlash(pattern)
		found := false
		for _, name := range rendered {
			inChart := strings.TrimPrefix(name, chartName+"/")
			if ok, _ := filepath.Match(pattern, inChart); ok {
				out = append(out, name)
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("could not find template %s in chart", pattern)
		}
	}
	return out, nil
}

// templateFiles lists templates/ recursively, sorted, as helm loads them.
func templateFiles(dir string) ([]string, error) {
	var files []string
	err := filepath.Walk(filepath.Join(dir, "templates"), func(path string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if !info.IsDir() {
			files = append(files, path)
		}
		return nil
	})
	sort.Strings(files)
	return files, err
}

// chartObject is .Chart: Chart.yaml's keys with the first letter upper-cased (appVersion →
// AppVersion), as helm exposes them.
func chartObject(meta map[string]interface{}) map[string]interface{} {
	out := map[string]interface{}{}
	for k, v := range meta {
		if k != "" {
			out[strings.ToUpper(k[:1])+k[1:]] = v
		}
	}
	return out
}

// funcMap is sprig's functions plus helm's own. Like helm, env and expandenv are left out: a
// render must not depend on the machine it runs on.
func funcMap(root *template.Template) template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")
	depth := 0
	f["include"] = func(name string, data interface{}) (string, error) {
		if depth > 1000 {
			return "", fmt.Errorf("include %q: too deeply nested", name)
		}
		depth++
		defer func() { depth-- }()
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	f["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(text)
		if err != nil {
			return "", err
		}
		var buf bytes.Buffer
		err = t.Execute(&buf, data)
		return strings.ReplaceAll(buf.String(), "<no value>", ""), err
	}
	f["required"] = func(message string, v interface{}) (interface{}, error) {
		if v == nil {
			return nil, fmt.Errorf("%s", message)
		}
		if s, ok := v.(string); ok && s == "" {
			return nil, fmt.Errorf("%s", message)
		}
		return v, nil
	}
	f["toYaml"] = func(v interface{}) string {
		var buf bytes.Buffer
		enc := yaml.NewEncoder(&buf)
		enc.SetIndent(2)
		if err := enc.Encode(v); err != nil {
			return ""
		}
		return strings.TrimSuffix(buf.String(), "\n")
	}
	f["fromYaml"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := yaml.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	f["toJson"] = func(v interface{}) string {
		b, err := json.Marshal(v)
		if err != nil {
			return ""
		}
		return string(b)
	}
	f["fromJson"] = func(s string) map[string]interface{} {
		m := map[string]interface{}{}
		if err := json.Unmarshal([]byte(s), &m); err != nil {
			m["Error"] = err.Error()
		}
		return m
	}
	// No cluster to ask: lookup finds nothing, as in `helm template`.
	f["lookup"] = func(...interface{}) map[string]interface{} { return map[string]interface{}{} }
	return f
}

var (
	templateLocation = regexp.MustCompile(`template: ([^:\s]+:\d+:\d+)`)
	calledFunction   = regexp.MustCompile(`error calling [A-Za-z_]+: `)
)

// cleanError turns Go's nested template error into helm's short form: the outermost template
// position, then the innermost message (what `fail` or `required` said).
func cleanError(err error) string {
	text := err.Error()
	where := "(unknown)"
	if m := templateLocation.FindStringSubmatch(text); m != nil {
		where = "(" + m[1] + ")"
	}
	message := text
	if locs := calledFunction.FindAllStringIndex(text, -1); locs != nil {
		message = text[locs[len(locs)-1][1]:]
	}
	return where + ": " + message
}
