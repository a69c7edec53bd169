"""Seed templates: requests from domains the traffic lacks, in the 18 served languages, for the teacher.

The sampled traffic holds almost no alarms or reminders outside ar and nl (no row in ja, de,
tr or zh; a handful in en, id and it: ``benchmarks/xsid_gap.py``), although they are among the
commonest voice-assistant requests. A student cannot learn what the traffic never shows it, so
these templates seed the domain, as the Home Assistant templates in the traffic seed smart-home
commands: setting, cancelling and listing alarms and reminders, and wake-up calls.

They are written by us, for this purpose; none is taken from a data set. They carry no labels:
the teacher labels each expansion like any other text, so the label set stays the teacher's.
Each language has patterns with ``{time}``, ``{day}`` and ``{thing}`` slots and the values to fill
them; `template_rows` expands them (every combination, then a seeded sample).

The traffic's only music, restaurant, weather, film and book requests are its English Snips rows, so
``worker.loop.template_domains`` seeds those five domains the same way in every language. `DOMAINS`
holds them all, by name, the alarms first.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Iterator, Sequence

from worker.loop.seeding import SourceRow
from worker.loop.template_domains import OTHER_DOMAINS, Language

ALARMS: dict[str, Language] = {
    "en": {
        "patterns": (
            "set an alarm for {time} {day}",
            "wake me up at {time} {day}",
            "alarm at {time} please",
            "cancel my {time} alarm",
            "turn off all alarms for {day}",
            "what alarms do i have {day}",
            "show me my alarms",
            "remind me to {thing} at {time}",
            "set a reminder {day} to {thing}",
            "delete the reminder to {thing}",
            "what are my reminders for {day}",
            "did i set a reminder to {thing}",
        ),
        "time": ("7 am", "6:30", "noon", "8 in the morning", "five pm", "9:15", "midnight", "10 pm"),
        "day": ("tomorrow", "today", "on monday", "on the weekend", "every weekday"),
        "thing": (
            "call mom",
            "take my pills",
            "buy milk",
            "water the plants",
            "pay the rent",
            "pick up the kids",
            "send the report",
        ),
    },
    "de": {
        "patterns": (
            "stell einen wecker für {time} {day}",
            "weck mich {day} um {time}",
            "wecker auf {time} bitte",
            "lösche den wecker um {time}",
            "schalte alle wecker für {day} aus",
            "welche wecker habe ich {day}",
            "zeig mir meine wecker",
            "erinnere mich um {time} daran, {thing}",
            "erstelle {day} eine erinnerung: {thing}",
            "lösche die erinnerung {thing}",
            "was sind meine erinnerungen für {day}",
            "habe ich eine erinnerung zum {thing}",
        ),
        "time": (
            "7 uhr",
            "halb sieben",
            "mittag",
            "8 uhr morgens",
            "17 uhr",
            "9:15",
            "mitternacht",
            "22 uhr",
        ),
        "day": ("morgen", "heute", "am montag", "am wochenende", "an allen werktagen"),
        "thing": (
            "mama anrufen",
            "tabletten nehmen",
            "milch kaufen",
            "blumen gießen",
            "miete zahlen",
            "kinder abholen",
            "bericht schicken",
        ),
    },
    "nl": {
        "patterns": (
            "zet een wekker om {time} {day}",
            "maak me {day} wakker om {time}",
            "wekker op {time} alsjeblieft",
            "verwijder de wekker van {time}",
            "zet alle wekkers voor {day} uit",
            "welke wekkers heb ik {day}",
            "laat mijn wekkers zien",
            "herinner me eraan om {time} {thing}",
            "maak {day} een herinnering om {thing}",
            "verwijder de herinnering om {thing}",
            "wat zijn mijn herinneringen voor {day}",
            "heb ik een herinnering om {thing}",
        ),
        "time": ("7 uur", "half zeven", "twaalf uur", "8 uur 's ochtends", "17 uur", "9:15", "middernacht"),
        "day": ("morgen", "vandaag", "maandag", "in het weekend", "elke werkdag"),
        "thing": (
            "mama te bellen",
            "mijn pillen te nemen",
            "melk te kopen",
            "de planten water te geven",
            "de huur te betalen",
            "de kinderen op te halen",
        ),
    },
    "fr": {
        "patterns": (
            "mets un réveil à {time} {day}",
            "réveille-moi {day} à {time}",
            "alarme à {time} s'il te plaît",
            "annule l'alarme de {time}",
            "désactive toutes les alarmes de {day}",
            "quelles alarmes j'ai {day}",
            "montre-moi mes alarmes",
            "rappelle-moi de {thing} à {time}",
            "crée un rappel {day} pour {thing}",
            "supprime le rappel pour {thing}",
            "quels sont mes rappels pour {day}",
            "est-ce que j'ai un rappel pour {thing}",
        ),
        "time": ("7 heures", "6 h 30", "midi", "8 heures du matin", "17 heures", "minuit", "22 h"),
        "day": ("demain", "aujourd'hui", "lundi", "ce week-end", "tous les jours de semaine"),
        "thing": (
            "appeler maman",
            "prendre mes médicaments",
            "acheter du lait",
            "arroser les plantes",
            "payer le loyer",
            "chercher les enfants",
        ),
    },
    "es": {
        "patterns": (
            "pon una alarma a las {time} {day}",
            "despiértame {day} a las {time}",
            "alarma a las {time} por favor",
            "cancela la alarma de las {time}",
            "apaga todas las alarmas de {day}",
            "qué alarmas tengo {day}",
            "muéstrame mis alarmas",
            "recuérdame {thing} a las {time}",
            "crea un recordatorio {day} para {thing}",
            "borra el recordatorio de {thing}",
            "cuáles son mis recordatorios para {day}",
            "tengo algún recordatorio para {thing}",
        ),
        "time": (
            "7",
            "6 y media",
            "12 del mediodía",
            "8 de la mañana",
            "5 de la tarde",
            "9:15",
            "10 de la noche",
        ),
        "day": ("mañana", "hoy", "el lunes", "el fin de semana", "todos los días laborables"),
        "thing": (
            "llamar a mamá",
            "tomar las pastillas",
            "comprar leche",
            "regar las plantas",
            "pagar el alquiler",
            "recoger a los niños",
        ),
    },
    "pt": {
        "patterns": (
            "coloca um alarme para as {time} {day}",
            "me acorda {day} às {time}",
            "alarme às {time} por favor",
            "cancela o alarme das {time}",
            "desliga todos os alarmes de {day}",
            "quais alarmes eu tenho {day}",
            "mostra meus alarmes",
            "me lembra de {thing} às {time}",
            "cria um lembrete {day} para {thing}",
            "apaga o lembrete de {thing}",
            "quais são meus lembretes para {day}",
            "eu tenho algum lembrete para {thing}",
        ),
        "time": ("7 horas", "6 e meia", "meio-dia", "8 da manhã", "5 da tarde", "9:15", "meia-noite"),
        "day": ("amanhã", "hoje", "na segunda", "no fim de semana", "todos os dias úteis"),
        "thing": (
            "ligar para a mãe",
            "tomar os remédios",
            "comprar leite",
            "regar as plantas",
            "pagar o aluguel",
            "buscar as crianças",
        ),
    },
    "it": {
        "patterns": (
            "imposta una sveglia alle {time} {day}",
            "svegliami {day} alle {time}",
            "sveglia alle {time} per favore",
            "cancella la sveglia delle {time}",
            "spegni tutte le sveglie di {day}",
            "che sveglie ho {day}",
            "mostrami le mie sveglie",
            "ricordami di {thing} alle {time}",
            "crea un promemoria {day} per {thing}",
            "elimina il promemoria per {thing}",
            "quali sono i miei promemoria per {day}",
            "ho un promemoria per {thing}",
        ),
        "time": ("7", "6 e mezza", "mezzogiorno", "8 di mattina", "17", "9:15", "mezzanotte", "22"),
        "day": ("domani", "oggi", "lunedì", "nel fine settimana", "tutti i giorni feriali"),
        "thing": (
            "chiamare la mamma",
            "prendere le medicine",
            "comprare il latte",
            "annaffiare le piante",
            "pagare l'affitto",
            "prendere i bambini",
        ),
    },
    "pl": {
        "patterns": (
            "ustaw budzik na {time} {day}",
            "obudź mnie {day} o {time}",
            "alarm na {time} proszę",
            "usuń budzik na {time}",
            "wyłącz wszystkie budziki na {day}",
            "jakie mam budziki {day}",
            "pokaż moje budziki",
            "przypomnij mi o {time}, żeby {thing}",
            "utwórz przypomnienie {day}: {thing}",
            "usuń przypomnienie, żeby {thing}",
            "jakie mam przypomnienia na {day}",
            "czy mam przypomnienie, żeby {thing}",
        ),
        "time": ("7:00", "6:30", "południe", "8 rano", "17:00", "9:15", "północ"),
        "day": ("jutro", "dziś", "w poniedziałek", "w weekend", "w każdy dzień roboczy"),
        "thing": (
            "zadzwonić do mamy",
            "wziąć leki",
            "kupić mleko",
            "podlać kwiaty",
            "zapłacić czynsz",
            "odebrać dzieci",
        ),
    },
    "ru": {
        "patterns": (
            "поставь будильник на {time} {day}",
            "разбуди меня {day} в {time}",
            "будильник на {time} пожалуйста",
            "отмени будильник на {time}",
            "выключи все будильники на {day}",
            "какие у меня будильники {day}",
            "покажи мои будильники",
            "напомни мне в {time} {thing}",
            "создай напоминание {day}: {thing}",
            "удали напоминание {thing}",
            "какие у меня напоминания на {day}",
            "есть ли у меня напоминание {thing}",
        ),
        "time": ("7 утра", "6:30", "полдень", "8 часов", "17:00", "9:15", "полночь"),
        "day": ("завтра", "сегодня", "в понедельник", "на выходные", "по будням"),
        "thing": (
            "позвонить маме",
            "выпить таблетки",
            "купить молоко",
            "полить цветы",
            "заплатить за квартиру",
            "забрать детей",
        ),
    },
    "tr": {
        "patterns": (
            "{day} saat {time} için alarm kur",
            "beni {day} saat {time} uyandır",
            "saat {time} alarm lütfen",
            "saat {time} alarmını iptal et",
            "{day} tüm alarmları kapat",
            "{day} hangi alarmlarım var",
            "alarmlarımı göster",
            "saat {time} bana {thing} hatırlat",
            "{day} için bir hatırlatıcı oluştur: {thing}",
            "{thing} hatırlatıcısını sil",
            "{day} hatırlatıcılarım neler",
            "{thing} için hatırlatıcım var mı",
        ),
        "time": ("7", "6.30", "12", "sabah 8", "17", "9.15", "gece yarısı"),
        "day": ("yarın", "bugün", "pazartesi", "hafta sonu", "her iş günü"),
        "thing": (
            "annemi aramayı",
            "ilaçlarımı almayı",
            "süt almayı",
            "çiçekleri sulamayı",
            "kirayı ödemeyi",
            "çocukları almayı",
        ),
    },
    "ar": {
        "patterns": (
            "اضبط المنبه على الساعة {time} {day}",
            "أيقظني {day} الساعة {time}",
            "منبه الساعة {time} من فضلك",
            "ألغ منبه الساعة {time}",
            "أطفئ كل المنبهات {day}",
            "ما هي المنبهات عندي {day}",
            "أرني المنبهات",
            "ذكرني أن {thing} الساعة {time}",
            "أنشئ تذكيرا {day} أن {thing}",
            "احذف التذكير بأن {thing}",
            "ما هي تذكيراتي {day}",
            "هل عندي تذكير أن {thing}",
        ),
        "time": ("السابعة", "السادسة والنصف", "الثانية عشرة ظهرا", "الثامنة صباحا", "الخامسة مساء"),
        "day": ("غدا", "اليوم", "يوم الاثنين", "في عطلة نهاية الأسبوع", "كل أيام العمل"),
        "thing": ("أتصل بأمي", "آخذ الدواء", "أشتري الحليب", "أسقي النباتات", "أدفع الإيجار", "أحضر الأطفال"),
    },
    "hi": {
        "patterns": (
            "{day} {time} बजे का अलार्म लगाओ",
            "मुझे {day} {time} बजे जगा देना",
            "{time} बजे अलार्म लगा दो",
            "{time} बजे वाला अलार्म हटा दो",
            "{day} के सारे अलार्म बंद कर दो",
            "{day} मेरे कौन से अलार्म हैं",
            "मेरे अलार्म दिखाओ",
            "मुझे {time} बजे {thing} याद दिलाना",
            "{day} के लिए रिमाइंडर बनाओ {thing}",
            "{thing} वाला रिमाइंडर हटा दो",
            "{day} के मेरे रिमाइंडर क्या हैं",
            "क्या मेरे पास {thing} का रिमाइंडर है",
        ),
        "time": ("7", "साढ़े छह", "12", "सुबह 8", "शाम 5", "रात 10"),
        "day": ("कल", "आज", "सोमवार को", "वीकेंड पर", "हर कामकाजी दिन"),
        "thing": ("मां को फोन करना", "दवा लेना", "दूध खरीदना", "पौधों को पानी देना", "किराया भरना"),
    },
    "th": {
        "patterns": (
            "ตั้งนาฬิกาปลุก{time}{day}",
            "ปลุกฉัน{day}ตอน{time}",
            "ตั้งปลุก{time}หน่อย",
            "ยกเลิกนาฬิกาปลุก{time}",
            "ปิดการปลุกทั้งหมด{day}",
            "{day}ฉันตั้งปลุกไว้กี่โมงบ้าง",
            "แสดงนาฬิกาปลุกของฉัน",
            "เตือนให้ฉัน{thing}ตอน{time}",
            "ตั้งการเตือน{day}ให้{thing}",
            "ลบการเตือนเรื่อง{thing}",
            "{day}ฉันมีการเตือนอะไรบ้าง",
            "ฉันตั้งเตือนเรื่อง{thing}ไว้หรือเปล่า",
        ),
        "time": ("เจ็ดโมง", "หกโมงครึ่ง", "เที่ยง", "แปดโมงเช้า", "ห้าโมงเย็น", "สี่ทุ่ม"),
        "day": ("พรุ่งนี้", "วันนี้", "วันจันทร์", "วันเสาร์อาทิตย์", "ทุกวันทำงาน"),
        "thing": ("โทรหาแม่", "กินยา", "ซื้อนม", "รดน้ำต้นไม้", "จ่ายค่าเช่า", "ไปรับลูก"),
    },
    "vi": {
        "patterns": (
            "đặt báo thức lúc {time} {day}",
            "đánh thức tôi lúc {time} {day}",
            "báo thức {time} nhé",
            "hủy báo thức lúc {time}",
            "tắt hết báo thức {day}",
            "{day} tôi có những báo thức nào",
            "cho tôi xem các báo thức",
            "nhắc tôi {thing} lúc {time}",
            "tạo lời nhắc {day} để {thing}",
            "xóa lời nhắc {thing}",
            "các lời nhắc của tôi {day} là gì",
            "tôi có lời nhắc {thing} không",
        ),
        "time": ("7 giờ", "6 giờ rưỡi", "12 giờ trưa", "8 giờ sáng", "5 giờ chiều", "10 giờ tối"),
        "day": ("ngày mai", "hôm nay", "thứ hai", "cuối tuần", "mỗi ngày làm việc"),
        "thing": ("gọi cho mẹ", "uống thuốc", "mua sữa", "tưới cây", "trả tiền nhà", "đón con"),
    },
    "id": {
        "patterns": (
            "setel alarm jam {time} {day}",
            "bangunkan aku {day} jam {time}",
            "pasang alarm jam {time} ya",
            "batalkan alarm jam {time}",
            "matikan semua alarm {day}",
            "alarm apa saja yang aku punya {day}",
            "tunjukkan alarmku",
            "ingatkan aku untuk {thing} jam {time}",
            "buat pengingat {day} untuk {thing}",
            "hapus pengingat untuk {thing}",
            "apa saja pengingatku {day}",
            "apakah aku punya pengingat untuk {thing}",
        ),
        "time": ("7", "setengah 7", "12 siang", "8 pagi", "5 sore", "10 malam"),
        "day": ("besok", "hari ini", "hari senin", "akhir pekan", "setiap hari kerja"),
        "thing": (
            "menelepon ibu",
            "minum obat",
            "beli susu",
            "menyiram tanaman",
            "bayar sewa",
            "menjemput anak",
        ),
    },
    "ko": {
        "patterns": (
            "{day} {time}에 알람 맞춰 줘",
            "{day} {time}에 깨워 줘",
            "{time} 알람 부탁해",
            "{time} 알람 취소해 줘",
            "{day} 알람 전부 꺼 줘",
            "{day} 알람 뭐 있어",
            "내 알람 보여 줘",
            "{time}에 {thing} 알려 줘",
            "{day} {thing} 리마인더 만들어 줘",
            "{thing} 리마인더 삭제해 줘",
            "{day} 리마인더 뭐 있어",
            "{thing} 리마인더 있었나",
        ),
        "time": ("7시", "6시 반", "정오", "아침 8시", "오후 5시", "밤 10시"),
        "day": ("내일", "오늘", "월요일", "주말", "평일마다"),
        "thing": ("엄마한테 전화하라고", "약 먹으라고", "우유 사라고", "화분에 물 주라고", "월세 내라고"),
    },
    "ja": {
        "patterns": (
            "{day}{time}にアラームをセットして",
            "{day}{time}に起こして",
            "{time}にアラームをお願い",
            "{time}のアラームを消して",
            "{day}のアラームを全部オフにして",
            "{day}のアラームは何がある",
            "アラームの一覧を見せて",
            "{time}に{thing}ことをリマインドして",
            "{day}{thing}ことをリマインダーに登録して",
            "{thing}リマインダーを削除して",
            "{day}のリマインダーを教えて",
            "{thing}リマインダーはあったっけ",
        ),
        "time": ("7時", "6時半", "正午", "朝8時", "午後5時", "夜10時"),
        "day": ("明日の", "今日の", "月曜日の", "週末の", "平日の"),
        "thing": ("母に電話する", "薬を飲む", "牛乳を買う", "植物に水をやる", "家賃を払う"),
    },
    "zh": {
        "patterns": (
            "{day}{time}设个闹钟",
            "{day}{time}叫醒我",
            "帮我定一个{time}的闹钟",
            "取消{time}的闹钟",
            "关掉{day}所有的闹钟",
            "我{day}有哪些闹钟",
            "给我看看我的闹钟",
            "{time}提醒我{thing}",
            "{day}设一个提醒{thing}",
            "删除{thing}的提醒",
            "我{day}有什么提醒",
            "我有没有设{thing}的提醒",
        ),
        "time": ("七点", "六点半", "中午十二点", "早上八点", "下午五点", "晚上十点"),
        "day": ("明天", "今天", "周一", "周末", "每个工作日"),
        "thing": ("给妈妈打电话", "吃药", "买牛奶", "给花浇水", "交房租", "接孩子"),
    },
}

DOMAINS: dict[str, dict[str, Language]] = {"alarms": ALARMS, **OTHER_DOMAINS}

_SLOT = re.compile(r"\{(\w+)\}")


def expansions(language: str, domain: str = "alarms") -> list[str]:
    """Every text the patterns of a domain make in a language, each slot filled every way, in order."""
    spec = DOMAINS[domain][language]
    texts: list[str] = []
    for pattern in spec["patterns"]:
        slots = _SLOT.findall(pattern)
        for values in itertools.product(*(spec[slot] for slot in slots)):
            texts.append(pattern.format(**dict(zip(slots, values, strict=True))))
    return list(dict.fromkeys(texts))


def template_rows(per_language: int, seed: int = 0, domains: Sequence[str] = ()) -> Iterator[SourceRow]:
    """At most ``per_language`` expansions of each domain in each language (a seeded sample when it has
    more), for the named ``domains`` (all when empty).

    Ids are ``template-<language>-<n>`` for the alarms (as before the other domains came) and
    ``template-<language>-<domain>-<n>`` for the rest, so adding a domain moves no alarm row between
    the trainer's training and validation buckets.
    """
    unknown = set(domains) - set(DOMAINS)
    if unknown:
        raise ValueError(f"unknown template domains {sorted(unknown)}; known: {list(DOMAINS)}")
    rng = random.Random(seed)
    for language in sorted(ALARMS):
        for domain in DOMAINS:
            if domains and domain not in domains:
                continue
            texts = expansions(language, domain)
            if len(texts) > per_language:
                texts = rng.sample(texts, per_language)
            prefix = f"template-{language}" if domain == "alarms" else f"template-{language}-{domain}"
            for n, text in enumerate(texts):
                yield SourceRow(f"{prefix}-{n}", text, language, "templates")
