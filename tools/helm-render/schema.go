package main

import (
	"fmt"
	"sort"
	"strings"

	"github.com/xeipuuv/gojsonschema"
)

// validateValues checks the merged values against the chart's values.schema.json, as helm does
// before rendering, and reports every violation with the path of the value:
//
//	values don't meet the specifications of the schema(s) in the following chart(s):
//	tokengate:
//	- tokengate.port: Invalid type. Expected: integer, given: string
func validateValues(c *chart, values map[string]interface{}) error {
	if c.schema == nil {
		return nil
	}
	schema, err := gojsonschema.NewSchema(gojsonschema.NewBytesLoader(c.schema))
	if err != nil {
		return fmt.Errorf("%s/values.schema.json: %v", c.dir, err)
	}
	result, err := schema.Validate(gojsonschema.NewGoLoader(values))
	if err != nil {
		return fmt.Errorf("validating values: %v", err)
	}
	if result.Valid() {
		return nil
	}
	var lines []string
	for _, e := range result.Errors() {
		// "if"/"then" and "oneOf" wrappers repeat what the errors under them say.
		if e.Type() == "condition_then" || e.Type() == "condition_else" || e.Type() == "number_all_of" {
			continue
		}
		lines = append(lines, "- "+e.String())
	}
	sort.Strings(lines)
	return fmt.Errorf("values don't meet the specifications of the schema(s) in the following chart(s):\n%s:\n%s",
		c.name, strings.Join(lines, "\n"))
}
