// Renders an Ollama TEMPLATE the way Ollama's template package does (Go's text/template, missingkey=zero, Ollama's
// `json` function) over a conversation read as JSON on stdin: {"template", "messages", "tools"}. Tools keep
// Ollama's request shape ({"type": "function", "function": {...}}); each function's JSON is kept as written.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Tool struct {
	Type     string          `json:"type"`
	Function json.RawMessage `json:"function"`
}

type Input struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl := template.Must(template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template))
	data := map[string]any{"Messages": in.Messages, "Tools": in.Tools}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
